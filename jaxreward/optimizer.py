"""AdamW with warmup and cosine or linear decay, weight decay on matrices only, global-norm clipping; which
parameters it trains."""

from __future__ import annotations

import jax
import optax
from flax import nnx

# An untied model's LM head (model.RewardModel.lm_head_DxV) is carried only so that an imported SFT checkpoint's
# head is exported as it was imported; scoring never reads it. It is kept out of the differentiated parameters:
# no gradient, no Adam moments, no weight decay (on Llama-3-8B dims 0.5B parameters, 5.9 GiB of fp32 state).
FROZEN = ("lm_head_DxV",)
_FROZEN_FILTER = nnx.Any(*(nnx.PathContains(name) for name in FROZEN))


def is_trained(path: tuple) -> bool:
  """Whether the parameter at `path` (a tuple of keys, as nnx.to_flat_state gives) is trained."""
  return not any(str(key) in FROZEN for key in path)


def split_trained(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(trained, frozen) parameters; nnx.merge_state(trained, frozen) is `params` again."""
  return nnx.split_state(params, nnx.Not(_FROZEN_FILTER), ...)


def learning_rate_schedule(train_cfg, total_steps: int) -> optax.Schedule:
  peak, warmup = train_cfg.learning_rate, min(train_cfg.warmup_steps, total_steps)
  end = peak * train_cfg.end_learning_rate_factor
  decay_steps = max(total_steps - warmup, 1)
  if train_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_cfg.end_learning_rate_factor)
  elif train_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:  # "constant"
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make(train_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train_cfg, total_steps)
  # Norm scales and biases (1-D) are not decayed, as in TRL/HF Trainer and most LLM recipes.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip_norm) if train_cfg.grad_clip_norm else optax.identity(),
      optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule
