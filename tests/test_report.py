"""metrics.jsonl and its TensorBoard twin: rows written, read back, cut at the resume step."""

import json
import os
import struct

from tensorboardX.proto import event_pb2

from jaxreward import report


def read_scalars(path):
  """(step, tag, value) of every scalar in a TFRecord event file."""
  out = []
  with open(path, "rb") as f:
    raw = f.read()
  pos = 0
  while pos < len(raw):
    (length,) = struct.unpack("<Q", raw[pos:pos + 8])
    event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
    pos += 12 + length + 4  # length, its CRC, the record, its CRC
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def event_files(folder):
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("events.out.tfevents."))


def test_rows_reach_jsonl_and_tensorboard(tmp_path):
  log = report.MetricsLog(str(tmp_path), 0, enabled=True)
  log.write({"kind": "train", "step": 1, "loss": 0.5, "note": "text", "bad": float("nan"), "none": None,
             "flag": True})
  log.write({"kind": "eval", "step": 2, "val_accuracy": 0.75})
  log.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and rows[0]["note"] == "text"
  (path,) = event_files(tmp_path)
  assert read_scalars(path) == [(1, "train/loss", 0.5), (2, "eval/val_accuracy", 0.75)]


def test_resume_drops_rows_past_the_restored_step(tmp_path):
  log = report.MetricsLog(str(tmp_path), 0, enabled=True)
  for step in (1, 2, 3):
    log.write({"kind": "train", "step": step, "loss": 1.0 / step})
  log.close()
  resumed = report.MetricsLog(str(tmp_path), 2, enabled=True)
  assert [r["step"] for r in resumed.rows] == [1, 2]
  resumed.close()
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_log_writes_nothing(tmp_path):
  log = report.MetricsLog(str(tmp_path / "w"), 0, enabled=False)
  log.write({"kind": "train", "step": 1, "loss": 1.0})
  log.close()
  assert not (tmp_path / "w").exists()
