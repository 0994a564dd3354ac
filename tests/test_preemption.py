"""SIGTERM checkpoints and exits 4; kill -9 at any moment resumes from the latest complete checkpoint.

Each case runs the real CLI in a subprocess and compares the final metrics.json with an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxreward import configuration, preemption
from tests.conftest import ROOT

ARGS = ["--config.mesh.data=1", "--config.train.num_steps=40", "--config.train.eval_every=15",
        "--config.train.log_every=2"]
COMPARED = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "best_step", "training_steps")


def start(workdir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, "-m", "jaxreward.main", "--config", str(ROOT / "configs/tiny.py"),
                           "--workdir", str(workdir), *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def wait_for_step(workdir, step, timeout=180):
  """Waits until metrics.jsonl has a row at or past `step` (training is under way)."""
  path = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists():
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
      if rows and rows[-1]["step"] >= step:
        return
    time.sleep(0.05)
  raise AssertionError(f"no progress to step {step} in {timeout} s")


def metrics(workdir):
  with open(workdir / "metrics.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  rc, _, err = finish(start(workdir))
  assert rc in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), err[-2000:]
  return metrics(workdir)


def test_sigterm_checkpoints_exits_4_and_resumes_identically(reference, tmp_path):
  proc = start(tmp_path)
  wait_for_step(tmp_path, 6)
  proc.send_signal(signal.SIGTERM)
  rc, _, err = finish(proc)
  assert rc == configuration.EXIT_PREEMPTED, err[-2000:]
  assert "stopped at step" in err
  assert any(name.isdigit() for name in os.listdir(tmp_path / "checkpoints"))
  rc, _, err = finish(start(tmp_path))
  assert "resumed from step" in err
  assert rc in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), err[-2000:]
  resumed = metrics(tmp_path)
  for key in COMPARED:
    assert resumed[key] == reference[key], key


@pytest.mark.parametrize("kill_at_step", [5, 27])
def test_kill_9_then_rerun_matches_uninterrupted(reference, tmp_path, kill_at_step):
  proc = start(tmp_path)
  wait_for_step(tmp_path, kill_at_step)
  proc.kill()
  finish(proc)
  rc, _, err = finish(start(tmp_path))
  assert rc in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), err[-2000:]
  resumed = metrics(tmp_path)
  for key in COMPARED:
    assert resumed[key] == reference[key], key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_ask_for_a_stop_between_steps(sig):
  # SIGHUP: a dropped ssh session or closed terminal must checkpoint like a preemption, not kill the run.
  stop = preemption.StopSignal()
  try:
    assert not stop.requested(1)
    os.kill(os.getpid(), sig)
    assert stop.requested(2, gather=False)
  finally:
    stop.restore()
  assert signal.getsignal(sig) is not stop._handle  # pylint: disable=protected-access
