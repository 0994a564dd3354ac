"""Two processes on localhost (one CPU device each, gloo) joined by jax.distributed: they train `tiny` to the same
metrics as one process with two devices, stop together on a SIGTERM to either host (JAX's preemption sync point),
do not hang when a host is killed (the coordination service's heartbeat stops the rest), and resume to exactly
the metrics of an uninterrupted run. Every subprocess runs under `timeout -s KILL`: after
jax.distributed.initialize SIGTERM no longer kills a process, and a hung collective must not hang the suite."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

WORKER = str(ROOT / "tests" / "multiprocess_worker.py")
KILL_AFTER_S = 240
HEARTBEAT_S = 5
# Long enough to interrupt twice; every eval also checkpoints; the stop check and a metrics row come at log_every.
OVERRIDES = {"train.num_steps": 40, "train.eval_every": 20, "train.log_every": 2,
             "distributed.heartbeat_timeout_s": HEARTBEAT_S}
COMPARED = ("val_accuracy", "val_loss", "train_loss")


def launch(args, xla_flags="", overrides=OVERRIDES):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             WORKER_OVERRIDES=json.dumps(overrides))
  return subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, WORKER, *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch_pair(workdir):
  port = str(free_port())
  return [launch([str(workdir), str(i), port]) for i in range(2)]


def result(proc, expected_rc=0):
  out, err = proc.communicate()
  assert proc.returncode == expected_rc, (f"worker exited {proc.returncode}, expected {expected_rc} "
                                          f"(-9/137: killed at {KILL_AFTER_S} s)\n{err[-3000:]}")
  return json.loads(out.strip().splitlines()[-1])


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for_step(workdir, step, procs, timeout=180):
  """Waits until process 0 logged a training row at or past `step`."""
  path, deadline = workdir / "metrics.jsonl", time.time() + timeout
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a worker ended before it was interrupted"
    if path.exists():
      steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"kind": "train"' in line]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.05)
  raise AssertionError(f"no progress to step {step} in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multi")
  return workdir, [result(w) for w in launch_pair(workdir)]


def test_two_processes_equal_one_process_with_two_devices(uninterrupted, tmp_path):
  multi_dir, multi = uninterrupted
  single = result(launch([str(tmp_path / "single"), "single"], "--xla_force_host_platform_device_count=2"))

  assert [(m["process_index"], m["process_count"], m["devices"]) for m in multi] == [(0, 2, 2), (1, 2, 2)]
  assert (single["process_count"], single["devices"]) == (1, 2)
  assert "2 process(es)" in multi[0]["mesh"] and "data=2" in multi[0]["mesh"]
  # Only process 0 writes the summary; every process computes the same (replicated) metrics.
  with open(os.path.join(multi_dir, "metrics.json")) as f:
    written = json.load(f)
  for key in COMPARED:
    assert written[key] == multi[0][key] == multi[1][key], key
    np.testing.assert_allclose(written[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_sigterm_to_one_host_stops_all_together_and_kill_9_does_not_hang(uninterrupted, tmp_path):
  _, reference = uninterrupted
  workdir = tmp_path / "interrupted"

  # A preemption notice reaches one host only: the preemption service picks a step, and both stop there.
  procs = launch_pair(workdir)
  wait_for_step(workdir, 4, procs)
  procs[1].send_signal(signal.SIGTERM)  # `timeout` passes it on to the worker.
  stopped = [result(p, expected_rc=4) for p in procs]
  assert stopped[0]["stopped_at"] == stopped[1]["stopped_at"] < OVERRIDES["train.num_steps"], stopped

  # The coordinator host dies without a word: the other one must not wait in a collective until the end of time.
  procs = launch_pair(workdir)
  wait_for_step(workdir, stopped[0]["stopped_at"] + 4, procs)
  # The Popen is `timeout`; its child is the worker itself.
  os.kill(int(subprocess.check_output(["pgrep", "-P", str(procs[0].pid)]).split()[0]), signal.SIGKILL)
  killed_at = time.time()
  _, err = procs[1].communicate()
  waited = time.time() - killed_at
  assert procs[1].returncode not in (0, 4, -9, 137), err[-2000:]  # Stopped by the service, not by `timeout`.
  assert waited < HEARTBEAT_S + 45, waited
  assert "stopped sending heartbeats" in err or "another task died" in err, err[-2000:]
  procs[0].communicate()

  # Re-running both resumes from the last complete checkpoint and ends exactly where an uninterrupted run ends.
  resumed = [result(p) for p in launch_pair(workdir)]
  for key in COMPARED:
    assert resumed[0][key] == resumed[1][key] == reference[0][key], key
