"""AdamW with warmup and cosine or linear decay, weight decay on matrices only, global-norm clipping."""

from __future__ import annotations

import jax
import optax


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
