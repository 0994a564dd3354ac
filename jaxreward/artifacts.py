"""Reading a finished (or running) work dir back: its config, tokenizer and model at a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
from flax import nnx

from jaxreward import checkpoint, configuration, model as model_lib, optimizer, sharding, tokenizer as tokenizer_lib


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  tokenizer: object
  model: model_lib.RewardModel
  step: int
  workdir: str


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise configuration.ConfigError(f"{workdir}: no config.json; not a jaxreward work dir")
  with open(path) as f:
    raw = json.load(f)
  config = configuration.defaults()
  for section, values in raw.items():
    for key, value in values.items():
      if key == "rules":
        value = [tuple(r) for r in value]
      config[section][key] = value
  return config


def resolve_step(ckpt: checkpoint.Checkpointer, which: str | int) -> int:
  steps = ckpt.all_steps()
  if not steps:
    raise configuration.ConfigError(f"{ckpt.directory}: no checkpoint saved yet")
  if which == "best":
    return ckpt.best_step()
  if which == "latest":
    return ckpt.latest_step()
  step = int(which)
  if step not in steps:
    raise configuration.ConfigError(f"{ckpt.directory}: no checkpoint at step {step}; have {sorted(steps)}")
  return step


def load(workdir: str, which: str | int = "best", mesh_cfg=None) -> Loaded:
  """The model at checkpoint `which` ('best', 'latest' or a step), placed on this process's devices."""
  from jaxreward import train  # pylint: disable=g-import-not-at-top  (train imports this module's users)
  config = read_config(workdir)
  tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  model_cfg = model_lib.ModelConfig.from_config(config.model, config.model.vocab_size or tokenizer_lib.vocab_size(tok))
  mesh_cfg = mesh_cfg or ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "rules": config.mesh.rules})
  mesh = sharding.make_mesh(mesh_cfg)
  rule_table = sharding.rules(mesh_cfg)
  tx, _ = optimizer.make(config.train, 1)
  graphdef, state, _ = train.create_state(model_cfg, tx, mesh, rule_table, config.train.seed)
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_best)
  step = resolve_step(ckpt, which)
  state, _ = ckpt.restore(step, state)
  ckpt.close()
  model = nnx.merge(graphdef, state["params"])
  return Loaded(config=config, tokenizer=tok, model=model, step=step, workdir=workdir)
