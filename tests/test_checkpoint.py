"""Checkpoints: parameters apart from the optimizer state (old single-item work dirs still restore); a damaged
latest step falls back to the previous one; a failed save or a non-finite stop ends in one line with every
committed step intact, and the re-run is exact."""

import dataclasses
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxreward import checkpoint, configuration, model as model_lib, optimizer, sharding, state
from jaxreward.configuration import ConfigError
from tests.conftest import ROOT, load_config, xla_flags

ARGS = ["--config.mesh.data=1", "--config.train.num_steps=6", "--config.train.eval_every=2"]
COMPARED = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "best_step", "training_steps")
FINISHED = (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED)


def cli(workdir, *args, file_size_limit=None):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
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
  arrays = [os.path.join(root, n) for item in ("params", "optimizer") for root, _, names in os.walk(step_dir / item)
            for n in names]
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
  # Parameters and optimizer state are separate items, so which save first passes the limit varies (step 2-6).
  line = one_error_line(cli(workdir, file_size_limit=48 * 1024), configuration.EXIT_BAD_INPUT)
  assert re.search(r"saving step [246]\b", line) and "File too large" in line and "re-run the same command" in line
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


def test_non_finite_stop_saves_the_last_checked_state(tmp_path):
  workdir = tmp_path / "w"
  line = one_error_line(cli(workdir, "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
                            "--config.train.eval_every=5"), configuration.EXIT_CRASH)
  bad = int(re.search(r"non-finite loss .* at step (\d+);", line).group(1))
  last = int(re.search(r"the state after step (\d+) is saved", line).group(1))
  assert last in (bad, bad + 1) and "its update was not applied" in line, line
  assert steps(workdir)[-1] == last  # Committed before the exit, with the iterator's state beside it.
  assert os.path.isdir(workdir / "checkpoints" / str(last) / "data")


# --- params apart from the optimizer state ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer():
  config = load_config("tiny")
  config.mesh.data = 1
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  return state.Trainer(model_lib.ModelConfig.from_config(config.model, 300), config.train, mesh, rule_table, 10)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bumped(train_state):
  """A state unlike the initial one, so a restore that returned the target itself would fail."""
  return jax.tree.map(lambda x: x + 1, train_state)


def test_params_and_optimizer_are_separate_items(trainer, tmp_path, caplog):
  saved = bumped(trainer.state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  ckpt.save(3, saved, {"next": 3}, {"val_accuracy": 0.5, "val_loss": 1.0})
  ckpt.wait()
  items = {p.name for p in (tmp_path / "checkpoints" / "3").iterdir() if p.is_dir()}
  assert {"data", "optimizer", "params"} <= items and "state" not in items
  full, data_state = ckpt.restore(3, trainer.state)
  assert data_state == {"next": 3} and set(full) == {"step", "params", "opt_state"}
  assert_trees_equal(full, saved)
  _, target = state.params_target(trainer.model_cfg, trainer.mesh, trainer.rule_table)
  with caplog.at_level(logging.WARNING):
    assert_trees_equal(ckpt.restore_params(3, target), saved["params"])
  assert "Metadata file does not exist" not in caplog.text  # orbax's noise about the item alone: filtered.
  ckpt.close()


def test_old_single_item_checkpoints_still_restore(trainer, tmp_path):
  saved = bumped(trainer.state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  # The layout before the split: one `state` item holding params and optimizer state together.
  ckpt.manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                                data=ocp.args.JsonSave({"position": 5})),
                    metrics={"val_accuracy": 0.5, "val_loss": 1.0}, force=True)
  ckpt.wait()
  assert_trees_equal(ckpt.restore(5, trainer.state)[0], saved)
  assert_trees_equal(ckpt.restore_params(5, trainer.state["params"], lambda: trainer.state), saved["params"])
  with pytest.raises(ConfigError, match="old single-item checkpoint; load it with artifacts.load"):
    ckpt.restore_params(5, trainer.state["params"])
  ckpt.close()


def test_adam_moments_of_the_lm_head_from_before_it_was_frozen_are_dropped(tmp_path):
  """An untied model's step saved when its LM head still had Adam moments (every parameter had) restores onto
  today's state without them, through a fresh Checkpointer (a resumed run) that then saves and restores as
  usual; a saved optimizer that differs in anything else stays an unreadable step."""
  config = load_config("tiny")
  config.mesh.data = 1
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  cfg = model_lib.ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                              mlp_dim=32, tie_embeddings=False)
  tx, _ = optimizer.make(config.train, 10)
  _, target, _ = state.create_state(cfg, tx, mesh, rule_table, seed=0)
  numbered = lambda tree: jax.tree.unflatten(jax.tree.structure(tree), [x + i for i, x in enumerate(jax.tree.leaves(
      tree))])  # Each leaf its own value, so a restore that mixed leaves up would fail.
  old = dict(bumped(target), opt_state=numbered(tx.init(target["params"])))
  before = checkpoint.Checkpointer(str(tmp_path), keep_best=3)
  before.save(2, old, {"next": 2}, {"val_accuracy": 0.5})
  other = optax.chain(tx, optax.scale_by_schedule(lambda count: 1.0))  # One more leaf besides the LM head's.
  before.save(4, dict(old, opt_state=other.init(target["params"])), {"next": 4}, {"val_accuracy": 0.5})
  before.close()

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=3)
  restored, data_state = ckpt.restore(2, target)
  assert data_state == {"next": 2}
  assert_trees_equal(restored["params"], old["params"])
  kept = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(old["opt_state"])[0]
          if "lm_head_DxV" not in jax.tree_util.keystr(p)]
  got = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(restored["opt_state"])[0]]
  assert [p for p, _ in got] == [p for p, _ in kept] and len(kept) < len(jax.tree.leaves(old["opt_state"]))
  assert_trees_equal([x for _, x in got], [x for _, x in kept])
  ckpt.save(3, restored, {"next": 3}, {"val_accuracy": 0.6})
  ckpt.wait()
  assert_trees_equal(ckpt.restore(3, target)[0], restored)
  with pytest.raises(checkpoint.CheckpointError, match="4: unreadable"):
    ckpt.restore(4, target)
  ckpt.close()


def test_a_checkpoint_of_the_other_block_layout_is_refused_in_one_line(trainer, tmp_path):
  """Blocks saved one per layer (work dirs from before model.scan_layers) against a stacked model: the setting that
  reads them, and no fallback (the step is not damaged)."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  ckpt.save(2, trainer.state, {"next": 2}, {"val_accuracy": 0.5, "val_loss": 1.0})
  ckpt.wait()
  stacked = dataclasses.replace(trainer.model_cfg, scan_layers=True)
  _, target = state.params_target(stacked, trainer.mesh, trainer.rule_table)
  message = "holds the blocks one per layer, the model stacked on a layers axis; set --config.model.scan_layers=False"
  with pytest.raises(ConfigError, match=message) as error:
    ckpt.restore_params(2, target)
  assert not isinstance(error.value, checkpoint.CheckpointError)
  _, target_state, _ = state.create_state(stacked, trainer.tx, trainer.mesh, trainer.rule_table, seed=0)
  with pytest.raises(ConfigError, match=message):
    ckpt.restore_latest(target_state, accept=lambda data: None, log=print)
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_checkpoint_names_resolve(trainer, tmp_path):
  assert checkpoint.parse_which("best") == "best" and checkpoint.parse_which("12") == 12
  with pytest.raises(ConfigError, match="best, latest or a step number"):
    checkpoint.parse_which("newest")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  with pytest.raises(ConfigError, match="no checkpoint saved yet"):
    ckpt.resolve("best")
  for step, acc in ((2, 0.9), (4, 0.6)):
    ckpt.save(step, trainer.state, {}, {"val_accuracy": acc, "val_loss": 1.0})
  ckpt.wait()
  assert (ckpt.resolve("best"), ckpt.resolve("latest"), ckpt.resolve(4)) == (2, 4, 4)
  with pytest.raises(ConfigError, match=r"no checkpoint at step 3; have \[2, 4\]"):
    ckpt.resolve(3)
  ckpt.close()


def test_orbax_leftovers_are_quiet_and_other_unraisables_are_not(monkeypatch):
  # After a damaged read is reported once, orbax's sibling read coroutine is collected with its own error:
  # that must not print a traceback, while any other unraisable exception still reaches Python's hook.
  seen = []
  monkeypatch.setattr(checkpoint, "_unraisable", seen.append)
  namespace = {}
  exec(compile("def read():\n  raise Exception('bad chunk')\n", "/x/orbax/checkpoint/read.py", "exec"), namespace)
  for raiser in (namespace["read"], lambda: int("mine")):
    try:
      raiser()
    except Exception as e:  # pylint: disable=broad-except
      checkpoint._quiet_closed_loop(types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__, object=None))
  assert [type(u.exc_value) for u in seen] == [ValueError]
