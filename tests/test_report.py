"""metrics.jsonl and its TensorBoard twin: rows written, read back, cut at the resume step."""

import json
import os
import struct

import pytest
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


def test_resume_tolerates_a_last_line_cut_short(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
  resumed = report.MetricsLog(str(tmp_path), 5, enabled=True)
  resumed.close()
  assert [r["step"] for r in resumed.rows] == [1, 2]
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
  (tmp_path / "metrics.jsonl").write_text('{"kind": "tr\n{"kind": "train", "step": 2}\n')
  with pytest.raises(report.ConfigError, match=r"metrics.jsonl:1: not a JSON row"):
    report.MetricsLog(str(tmp_path), 5, enabled=True)


def test_other_hosts_take_host_0s_rows_and_never_read_the_file(tmp_path, monkeypatch):
  """With several hosts, host 1 gets the rows host 0 kept (a collective after host 0's rewrite), even while the
  file on disk is half written."""
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "st')
  kept = [{"kind": "eval", "step": 2, "val_accuracy": 0.75}]
  sent = []
  monkeypatch.setattr(report.hosts, "several", lambda: True)
  monkeypatch.setattr(report.hosts, "is_main", lambda: False)
  monkeypatch.setattr(report.hosts, "from_main", lambda data: sent.append(data) or json.dumps(kept).encode())
  other = report.MetricsLog(str(tmp_path), 2, enabled=False)
  assert other.rows == kept and other.evals() == kept and sent == [None]
  assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "train", "st'


def test_disabled_log_writes_nothing(tmp_path):
  log = report.MetricsLog(str(tmp_path / "w"), 0, enabled=False)
  log.write({"kind": "train", "step": 1, "loss": 1.0})
  log.close()
  assert not (tmp_path / "w").exists()
