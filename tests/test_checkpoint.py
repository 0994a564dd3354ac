"""Checkpoints: parameters apart from the optimizer state, and old single-item work dirs still restore."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from jaxreward import checkpoint, model as model_lib, sharding, state
from jaxreward.configuration import ConfigError


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


def test_params_and_optimizer_are_separate_items(trainer, tmp_path):
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
  assert_trees_equal(ckpt.restore_params(3, target), saved["params"])
  ckpt.close()


def test_old_single_item_checkpoints_still_restore(trainer, tmp_path):
  saved = bumped(trainer.state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=1)
  # The layout before the split: one `state` item holding params and optimizer state together.
  ckpt.manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(saved), data=ocp.args.JsonSave({})),
                    metrics={"val_accuracy": 0.5, "val_loss": 1.0}, force=True)
  ckpt.wait()
  assert_trees_equal(ckpt.restore(5, trainer.state)[0], saved)
  assert_trees_equal(ckpt.restore_params(5, trainer.state["params"], lambda: trainer.state), saved["params"])
  with pytest.raises(ConfigError, match="old single-item checkpoint; load it with artifacts.load"):
    ckpt.restore_params(5, trainer.state["params"])
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
