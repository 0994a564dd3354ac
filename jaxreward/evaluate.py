"""Scoring fixed sets of pairs with a jitted, sharded step: validation and the training-sample check."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreward import loss, sharding


def make_eval_step(graphdef, params_shardings, mesh, rule_table):
  """(params, batch) -> (sums, r_Bx2, weight_B), replicated so every host reads the global batch's values."""

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    r_Bx2 = model.score_pairs(batch["tokens_BxPxL"], batch["lengths_BxP"])
    return loss.batch_sums(r_Bx2, batch["weight_B"], batch["margin_B"]), r_Bx2, batch["weight_B"]

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings(mesh, rule_table)),
                 out_shardings=replicated)


def batch_shardings(mesh, rule_table) -> dict:
  ndims = {"tokens_BxPxL": 3, "lengths_BxP": 2, "weight_B": 1, "margin_B": 1}
  return {k: sharding.batch_sharding(mesh, rule_table, n) for k, n in ndims.items()}


def to_device(batch: dict, shardings: dict) -> dict:
  """Each host contributes its rows; together they form the global batch."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def run(eval_step, params, batches: list[dict], shardings: dict) -> tuple[dict, np.ndarray]:
  """Means over all real pairs, and the [num_real_pairs, 2] rewards in batch order."""
  total, rewards = None, []
  pending = None
  for batch in batches:
    out = eval_step(params, to_device(batch, shardings))
    if pending is not None:  # Fetch one batch late so the device never waits for the host.
      total, rewards = _accumulate(total, rewards, pending)
    pending = out
  if pending is not None:
    total, rewards = _accumulate(total, rewards, pending)
  return loss.finalize(total), np.concatenate(rewards) if rewards else np.zeros((0, 2), np.float32)


def _accumulate(total, rewards, out):
  sums, r_Bx2, weight_B = jax.device_get(out)
  total = sums if total is None else {k: total[k] + sums[k] for k in total}
  rewards.append(np.asarray(r_Bx2)[np.asarray(weight_B) > 0])
  return total, rewards
