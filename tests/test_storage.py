"""Work dirs on an object store: a real `gs://` path, served offline by a local GCS emulator.

epath reaches it through gcsfs, orbax's arrays through tensorstore's own GCS driver: both are pointed at the
emulator on 127.0.0.1 (tests/gcs_emulator.py; STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL), with fixed test
credentials so that neither looks for a metadata server. Skipped when gcsfs or gcp-storage-emulator is not installed.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from jaxreward import report, rundir, storage, train
from jaxreward.commands import evaluate as evaluate_cmd, export as export_cmd, score as score_cmd
from jaxreward.configuration import ConfigError
from tests.conftest import load_config

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")
BUCKET = "jaxreward-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """gs://BUCKET on an in-memory emulator for this module; yields the bucket's URL."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  port = _free_port()
  emulator = str(pathlib.Path(__file__).parent / "gcs_emulator.py")
  server = subprocess.Popen([sys.executable, emulator, "start", "--host", "127.0.0.1", "--port", str(port),
                             "--default-bucket", BUCKET, "--in-memory", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  settings = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "FSSPEC_GCS_TOKEN": "anon",
              "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GCE_METADATA_HOST": "127.0.0.1:1",
              "GCE_METADATA_ROOT": "127.0.0.1:1"}
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  # The plain GCS file system: gcsfs's default one first asks a gRPC control API for the bucket's type.
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # fsspec read FSSPEC_GCS_TOKEN when imported.
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  fsspec.filesystem("gcs").clear_instance_cache()
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.skip("the GCS emulator did not start")
      time.sleep(0.2)
  yield f"gs://{BUCKET}"
  server.kill()
  server.wait()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def test_atomic_writes_and_folders_round_trip(gcs, tmp_path):
  target = f"{gcs}/files"
  storage.write_atomically(f"{target}/a/b.json", '{"x": 1}')
  storage.write_atomically(f"{target}/c.bin", b"\x00\x01")
  assert storage.isfile(f"{target}/a/b.json") and storage.isdir(f"{target}/a") and not storage.isfile(target)
  assert storage.listdir(target) == ["a", "c.bin"]
  assert json.loads(storage.read_text(f"{target}/a/b.json")) == {"x": 1}
  with storage.writing_folder(f"{target}/up") as local:
    os.makedirs(os.path.join(local, "sub"))
    open(os.path.join(local, "sub", "f.txt"), "w").write("hi")
  with storage.local_copy(f"{target}/up") as local:
    assert open(os.path.join(local, "sub", "f.txt")).read() == "hi"
  storage.move_folder(f"{target}/up", f"{target}/moved/up")
  assert not storage.isdir(f"{target}/up") and storage.isfile(f"{target}/moved/up/sub/f.txt")
  assert storage.join(gcs, "x") == f"{gcs}/x"  # No abspath on a URL, and no local folder named "gs:".
  assert not os.path.exists("gs:")


def test_remote_metrics_go_up_on_eval_rows_flush_and_close_not_on_every_row(gcs):
  """An object store has no append: metrics.jsonl is re-uploaded whole, so not on every train row."""
  workdir = f"{gcs}/metrics"
  steps = lambda: [json.loads(line)["step"] for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  log = report.MetricsLog(workdir, 0, enabled=True)
  log.write({"kind": "train", "step": 1, "loss": 0.5})
  assert steps() == []  # Buffered.
  log.write({"kind": "eval", "step": 2, "val_accuracy": 0.75})
  assert steps() == [1, 2] and any(n.startswith("events.out") for n in storage.listdir(workdir))
  log.write({"kind": "train", "step": 3, "loss": 0.4})
  assert steps() == [1, 2]
  log.flush()  # What train.py calls before a checkpoint.
  assert steps() == [1, 2, 3]
  log.write({"kind": "train", "step": 4, "loss": 0.3})
  log.close()
  assert steps() == [1, 2, 3, 4]
  resumed = report.MetricsLog(workdir, 3, enabled=True)  # Resuming from a checkpoint at step 3.
  assert [r["step"] for r in resumed.rows] == [1, 2, 3] and steps() == [1, 2, 3]
  resumed.close()


def test_remote_lock_refuses_a_live_holder_and_takes_a_dead_ones(gcs):
  workdir = f"{gcs}/locked"
  lock_path = f"{workdir}/{rundir.LOCK_FILE}"
  live = {"pid": os.getppid(), "host": socket.gethostname()}
  storage.write_atomically(lock_path, json.dumps(live))
  logs = []
  with pytest.raises(ConfigError, match="in use by another run"):
    rundir.Lock(workdir).acquire(logs.append)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  storage.write_atomically(lock_path, json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  lock = rundir.Lock(workdir)
  lock.acquire(logs.append)
  assert json.loads(storage.read_text(lock_path))["pid"] == os.getpid()
  assert any("took over" in line for line in logs) and any("no atomic create" in line for line in logs)
  lock.release()
  assert not storage.path(lock_path).exists()


def test_run_on_gcs_resumes_and_serves_every_command(gcs, tiny_run, tmp_path, capsys):
  """configs/tiny.py to gs://, stopped at step 7 and resumed: the same results as the local uninterrupted run;
  then evaluate, score and export read the remote work dir."""
  workdir = f"{gcs}/tiny"
  config = load_config("tiny")
  config.mesh.data = 1
  config.train.max_steps_per_run = 7
  first = train.train_and_evaluate(config, workdir)
  assert first["preempted"] and first["stopped_at"] == 7
  config.train.max_steps_per_run = 0
  resumed = train.train_and_evaluate(config, workdir)
  for key in ("val_accuracy", "train_accuracy", "val_loss", "train_loss", "best_step"):
    assert resumed[key] == tiny_run["summary"][key], key
  names = storage.listdir(workdir)
  for name in ("run.json", "config.json", "tokenizer", "checkpoints", "metrics.json", "metrics.jsonl", "README.md",
               "learning_curves.png", "reliability.png"):
    assert name in names, name
  assert rundir.LOCK_FILE not in names
  assert len([n for n in names if n.startswith("events.out.tfevents.")]) == 2  # One per run, copied up.
  rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  local_rows = [json.loads(line) for line in open(os.path.join(tiny_run["workdir"], "metrics.jsonl"))]
  assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in local_rows]
  assert not os.path.exists("gs:")

  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"}) + "\n"
                          for i in range(6)))
  assert evaluate_cmd.main(["--workdir", workdir, "--data", str(data)]) == 0
  report = json.loads(storage.read_text(f"{workdir}/eval/pairs/report.json"))
  assert report["num_pairs"] == 6 and storage.isfile(f"{workdir}/eval/pairs/reliability.png")
  scored = f"{gcs}/scored.jsonl"
  assert score_cmd.main(["--model", workdir, "--data", str(data), "--out", scored]) == 0
  assert len(storage.read_text(scored).splitlines()) == 6
  out = tmp_path / "export"
  assert export_cmd.main([f"{workdir}/checkpoints/20", str(out)]) == 0
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  assert "step 20 of gs://" in capsys.readouterr().out
  remote_out = f"{gcs}/exported"  # An output folder there too: refused when not empty, replaced with --overwrite.
  assert export_cmd.main([workdir, remote_out]) == 0
  assert sorted(storage.listdir(remote_out)) == sorted(os.listdir(out))
  assert export_cmd.main([workdir, remote_out]) == 2 and "not empty" in capsys.readouterr().err
  assert export_cmd.main([workdir, f"{workdir}/inside"]) == 2
  assert export_cmd.main([workdir, remote_out, "--overwrite"]) == 0
