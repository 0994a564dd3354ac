"""state.Trainer: reset builds the fresh state after the old one is gone, and equals a new Trainer's."""

import jax
import numpy as np

from jaxreward import model as model_lib, sharding, state
from tests.conftest import load_config


def test_reset_frees_the_old_state_before_building_the_new(monkeypatch):
  config = load_config("tiny")
  config.mesh.data = 1
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model_cfg = model_lib.ModelConfig.from_config(config.model, 300)
  trainer = state.Trainer(model_cfg, config.train, mesh, rule_table, 10)
  fresh = jax.tree.map(np.asarray, trainer.state)
  trainer.state = jax.tree.map(lambda x: x + 1, trainer.state)  # As if trained on a throwaway batch.
  old_ids = {id(x) for x in jax.tree.leaves(trainer.state)}
  create = state.create_state
  alive_at_create = []

  def watching_create(*args):
    # Two live states would double the peak memory: none of the old arrays may still be alive here.
    alive_at_create.append(sum(id(x) in old_ids for x in jax.live_arrays()))
    return create(*args)

  monkeypatch.setattr(state, "create_state", watching_create)
  trainer.reset()
  assert alive_at_create == [0]
  for got, want in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(fresh), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
