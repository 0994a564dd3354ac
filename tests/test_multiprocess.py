"""Two processes on localhost (one CPU device each, gloo) train `tiny` to the same metrics as one process with
two devices. Every subprocess runs under `timeout -s KILL`: after jax.distributed.initialize SIGTERM is
ignored, and a hung collective must not hang the suite."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT

WORKER = str(ROOT / "tests" / "multiprocess_worker.py")
KILL_AFTER_S = 240


def launch(args, xla_flags):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, WORKER, *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc):
  out, err = proc.communicate()
  assert proc.returncode == 0, f"worker exited {proc.returncode} (-9/137: killed at {KILL_AFTER_S} s)\n{err[-3000:]}"
  return json.loads(out.strip().splitlines()[-1])


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  multi_dir, single_dir = str(tmp_path / "multi"), str(tmp_path / "single")
  port = str(free_port())
  workers = [launch([multi_dir, str(i), port], "") for i in range(2)]
  multi = [result(w) for w in workers]
  single = result(launch([single_dir, "single"], "--xla_force_host_platform_device_count=2"))

  assert [(m["process_index"], m["process_count"], m["devices"]) for m in multi] == [(0, 2, 2), (1, 2, 2)]
  assert (single["process_count"], single["devices"]) == (1, 2)
  assert "2 process(es)" in multi[0]["mesh"] and "data=2" in multi[0]["mesh"]
  # Only process 0 writes the summary; every process computes the same (replicated) metrics.
  with open(os.path.join(multi_dir, "metrics.json")) as f:
    written = json.load(f)
  for key in ("val_accuracy", "val_loss", "train_loss"):
    assert written[key] == multi[0][key] == multi[1][key], key
    np.testing.assert_allclose(written[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
