"""Checkpoints: a damaged latest step falls back to the previous one; a failed save or a non-finite stop ends
in one line with every committed step intact, and the re-run is exact."""

import json
import os
import resource
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxreward import checkpoint, configuration
from tests.conftest import ROOT

ARGS = ["--config.mesh.data=1", "--config.train.num_steps=6", "--config.train.eval_every=2"]
COMPARED = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "best_step", "training_steps")
FINISHED = (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED)


def cli(workdir, *args, file_size_limit=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  limit = None
  if file_size_limit is not None:  # Python ignores SIGXFSZ, so a write past the limit fails like a full disk.
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
  return subprocess.run([sys.executable, "-m", "jaxreward.main", "--config", str(ROOT / "configs/tiny.py"),
                         "--workdir", str(workdir), *ARGS, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, preexec_fn=limit)


def metrics(workdir):
  with open(workdir / "metrics.json") as f:
    summary = json.load(f)
  return {k: summary[k] for k in COMPARED}


def steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def damage(step_dir):
  """Cuts the largest array file of a step short, as a crash or a bad disk would."""
  arrays = [os.path.join(root, n) for root, _, names in os.walk(step_dir / "state") for n in names]
  biggest = max(arrays, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(10)


def one_error_line(result, code):
  assert result.returncode == code, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A run whose first saves hit a full disk (one line, exit 2), re-run after space was freed: it must equal an
  uninterrupted run, which the other tests compare against."""
  workdir = tmp_path_factory.mktemp("disk_full") / "w"
  line = one_error_line(cli(workdir, file_size_limit=64 * 1024), configuration.EXIT_BAD_INPUT)
  assert "saving step 2" in line and "File too large" in line and "re-run the same command" in line
  result = cli(workdir)
  assert result.returncode in FINISHED, result.stderr[-3000:]
  return metrics(workdir)


def test_damaged_latest_step_falls_back_and_resumes_exactly(reference, tmp_path):
  workdir = tmp_path / "w"
  assert cli(workdir, "--config.train.max_steps_per_run=5").returncode == configuration.EXIT_PREEMPTED
  assert steps(workdir)[-1] == 5 and len(steps(workdir)) == 2
  previous = steps(workdir)[0]
  shutil.copytree(workdir, tmp_path / "copy")
  damage(workdir / "checkpoints" / "5")
  result = cli(workdir)
  assert result.returncode in FINISHED, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert f"warning: {workdir}/checkpoints/5: unreadable" in result.stderr
  assert f"resumed from step {previous}" in result.stderr
  assert os.listdir(workdir / checkpoint.DAMAGED) == ["5"]
  assert metrics(workdir) == reference



def _saved(workdir, steps_to_save=(4, 6)):
  """A Checkpointer's folder with a small state saved at `steps_to_save` (the latest and the best are kept)."""
  state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}}
  ckpt = checkpoint.Checkpointer(str(workdir), keep_best=1)
  for step in steps_to_save:
    ckpt.save(step, {"step": jnp.int32(step), "params": state["params"]}, {"position": step},
              {"val_accuracy": 1 - step / 10, "val_loss": 1.0})
  ckpt.close()
  return state


@pytest.mark.parametrize("how,message", [
    (damage, "unreadable (Exception: Encountered error while reading array"),
    (lambda d: shutil.rmtree(d / "data"), "Item \"data\" was not found"),
    (lambda d: (d / "data" / "metadata").write_text("{}"), "unreadable (empty data iterator state)"),
    (lambda d: (d / "data" / "metadata").write_text(""), "unreadable (JSONDecodeError"),
])
def test_each_kind_of_damage_falls_back_to_the_previous_step(tmp_path, how, message):
  target = _saved(tmp_path)
  how(tmp_path / "checkpoints" / "6")
  warnings = []
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  step, state, data = ckpt.restore_latest(target, lambda data: None, warnings.append)
  assert (step, int(state["step"]), data) == (4, 4, {"position": 4})
  assert len(warnings) == 1 and "checkpoints/6: " in warnings[0] and message in warnings[0], warnings
  assert ckpt.all_steps() == [4] and os.listdir(tmp_path / checkpoint.DAMAGED) == ["6"]
  ckpt.close()


def test_a_data_state_the_iterator_refuses_falls_back(tmp_path):
  target = _saved(tmp_path)

  def accept(data):
    if data["position"] == 6:
      raise ValueError("bad iterator state")

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  warnings = []
  assert ckpt.restore_latest(target, accept, warnings.append)[0] == 4
  assert "unreadable data iterator state (ValueError: bad iterator state)" in warnings[0]
  ckpt.close()


def test_nothing_usable_is_one_error(tmp_path):
  target = _saved(tmp_path)
  for step in (4, 6):
    damage(tmp_path / "checkpoints" / str(step))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  with pytest.raises(checkpoint.CheckpointError) as err:
    ckpt.restore_latest(target, lambda data: None, lambda message: None)
  assert str(err.value).startswith("no usable checkpoint: ") and "\n" not in str(err.value)
  assert "checkpoints/6: unreadable" in str(err.value) and "checkpoints/4: unreadable" in str(err.value)
  assert ckpt.all_steps() == [4, 6]  # A refused run moves nothing.
  ckpt.close()


def test_non_finite_stop_commits_the_last_checkpoint(tmp_path):
  workdir = tmp_path / "w"
  line = one_error_line(cli(workdir, "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
                            "--config.train.eval_every=1"), configuration.EXIT_CRASH)
  assert "non-finite loss" in line and "the last checkpoint (step 1)" in line
  assert steps(workdir) == [1]
