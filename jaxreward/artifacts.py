"""Reading a finished (or running) work dir back: its config, tokenizer and model at a checkpoint."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
from flax import nnx

from jaxreward import checkpoint, configuration, model as model_lib, optimizer, sharding, state, storage
from jaxreward import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  tokenizer: object
  model: model_lib.RewardModel
  step: int
  workdir: str


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    raise configuration.ConfigError(f"{workdir}: no config.json; not a jaxreward work dir")
  raw = json.loads(storage.read_text(path))
  config = configuration.defaults()
  for section, values in raw.items():
    for key, value in values.items():
      if key == "rules":
        value = [tuple(r) for r in value]
      if (section, key) == ("model", "remat"):
        value = configuration.remat_policy(value)  # A boolean in work dirs from before the policies.
      config[section][key] = value
  return config


def load(workdir: str, which: str | int = "best", mesh_cfg=None) -> Loaded:
  """The model at checkpoint `which` ('best', 'latest' or a step), on this host's devices (or `mesh_cfg`'s).
  Only the parameters are read; no optimizer state is built (but for work dirs saved before the split)."""
  config = read_config(workdir)
  tok = tokenizer_lib.load_saved(workdir)
  model_cfg = model_lib.ModelConfig.from_config(config.model, config.model.vocab_size or tokenizer_lib.vocab_size(tok))
  mesh_cfg = mesh_cfg or sharding.host_mesh_config(config.mesh.rules)
  mesh = sharding.make_mesh(mesh_cfg)
  rule_table = sharding.rules(mesh_cfg)
  graphdef, target = state.params_target(model_cfg, mesh, rule_table)

  def old_target_state():
    return state.create_state(model_cfg, optimizer.make(config.train, 1)[0], mesh, rule_table, config.train.seed)[1]

  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_best)
  step = ckpt.resolve(which)
  params = ckpt.restore_params(step, target, old_target_state)
  ckpt.close()
  return Loaded(config=config, tokenizer=tok, model=nnx.merge(graphdef, params), step=step, workdir=workdir)
