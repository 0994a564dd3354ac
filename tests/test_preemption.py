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
from tests.conftest import ROOT, xla_flags

ARGS = ["--config.mesh.data=1", "--config.train.num_steps=40", "--config.train.eval_every=15",
        "--config.train.log_every=2"]
COMPARED = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "best_step", "training_steps")


def start(workdir):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  return subprocess.Popen([sys.executable, "-m", "jaxreward.main", "--config", str(ROOT / "configs/tiny.py"),
                           "--workdir", str(workdir), *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def rows(workdir):
  """metrics.jsonl's rows; a last line that a kill -9 cut short is not one yet."""
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


def wait_for_step(workdir, step, timeout=180):
  """Waits until metrics.jsonl's last row is at or past `step` (training is under way)."""
  path = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists():
      written = rows(workdir)
      if written and written[-1]["step"] >= step:
        return
    time.sleep(0.05)
  raise AssertionError(f"no progress to step {step} in {timeout} s")


def last_step(workdir):
  return rows(workdir)[-1]["step"]


def metrics(workdir):
  with open(workdir / "metrics.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  rc, _, err = finish(start(workdir))
  assert rc in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), err[-2000:]
  return metrics(workdir)


def test_sigterm_and_kill_9_at_any_moment_resume_identically(reference, tmp_path):
  """One work dir interrupted three ways in turn, each re-run resuming the last: kill -9 before the first
  checkpoint (the re-run starts over), SIGTERM (checkpoints, exits 4, the re-run resumes there), kill -9 after
  a checkpoint (the re-run resumes from it). Every interruption's resume feeds the next, and the metrics are
  compared exactly, so one wrong resume anywhere makes the final metrics differ from the uninterrupted run's
  (one chain of CLI runs instead of a chain per kind of interruption: each run is mostly start-up)."""
  proc = start(tmp_path)
  wait_for_step(tmp_path, 5)
  proc.kill()
  finish(proc)

  proc = start(tmp_path)
  wait_for_step(tmp_path, last_step(tmp_path) + 2)  # A row of this run's own, past the killed run's rows.
  proc.send_signal(signal.SIGTERM)
  rc, _, err = finish(proc)
  assert rc == configuration.EXIT_PREEMPTED, err[-2000:]
  assert "stopped at step" in err
  stopped = max(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
  assert stopped < 27, stopped

  proc = start(tmp_path)
  wait_for_step(tmp_path, 27)
  proc.kill()
  _, _, err = finish(proc)
  assert f"resumed from step {stopped}" in err, err[-2000:]

  rc, _, err = finish(start(tmp_path))
  assert "resumed from step" in err
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
