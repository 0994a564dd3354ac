"""Train-step throughput: step time, tokens/s, achieved GFLOP/s and % of a given peak, after warm-up.

  python tools/bench.py --config configs/small.py [--steps 20] [--peak_gflops 185] [--length 64]

Times forward + backward + AdamW update of the real jitted, sharded train step on batches of the
config's batch size at a fixed padded length (real tokens = all tokens here, so tokens/s has no
padding in it). FLOPs come from XLA's own cost analysis of the compiled step; compile time is reported
separately, and the number of compilations after warm-up is counted (it must be 0).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxreward import model as model_lib, pipeline, sharding, state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Run configuration file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation and caches).")
_PEAK = flags.DEFINE_float("peak_gflops", 185.0, "Peak fp32 GFLOP/s of the machine (2 Zen2 cores with FMA: ~185).")
_LENGTH = flags.DEFINE_integer("length", 0, "Padded sequence length; 0 = the config's data.max_length.")
_VOCAB = flags.DEFINE_integer("vocab", 0, "Vocabulary size; 0 = the config's data.vocab_size.")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def main(argv):
  del argv
  config = _CONFIG.value
  t = config.train
  length = _LENGTH.value or config.data.max_length
  vocab = _VOCAB.value or config.data.vocab_size
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab)
  t.center_rewards_coef = 0.0
  trainer = state.Trainer(model_cfg, t, mesh, rule_table, 1000)
  step = trainer.train_step
  rng = np.random.default_rng(0)
  b = t.batch_size
  # One pair per group, one full-length sequence per row: real tokens = all tokens.
  host_batch = pipeline.Batch(tokens_GxRxL=rng.integers(2, vocab, size=(b, 2, length)).astype(np.int32),
                              ends_GxBxP=np.tile(np.array([[[length - 1, 2 * length - 1]]], np.int32), (b, 1, 1)),
                              weight_GxB=np.ones((b, 1), np.float32), margin_GxB=np.zeros((b, 1), np.float32))
  batch = host_batch.on_device(trainer.batch_sharding)
  train_state = trainer.state

  start = time.perf_counter()
  compiled = step.lower(train_state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))

  for _ in range(_WARMUP.value):
    train_state, metrics = step(train_state, batch)
  jax.block_until_ready(metrics)
  cache_before = step._cache_size()  # pylint: disable=protected-access
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    train_state, metrics = step(train_state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  recompiles = step._cache_size() - cache_before  # pylint: disable=protected-access

  step_s = float(np.median(times))
  tokens = b * 2 * length
  params = sum(x.size for x in jax.tree.leaves(train_state["params"]))
  analytic = 6 * params * tokens + 12 * model_cfg.num_layers * model_cfg.hidden_size * length * tokens / 2
  result = {
      "config": config.model.to_dict() | {"batch_size": b, "length": length, "vocab": vocab},
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "mesh": sharding.describe(mesh),
      "parameters": int(params), "compile_s": compile_s, "step_s_median": step_s,
      "step_s_min": float(np.min(times)), "tokens_per_s": tokens / step_s, "pairs_per_s": b / step_s,
      "xla_flops_per_step": flops, "analytic_flops_per_step": analytic,
      "achieved_gflops": flops / step_s / 1e9, "peak_gflops": _PEAK.value,
      "percent_of_peak": 100 * flops / step_s / 1e9 / _PEAK.value, "recompiles_after_warmup": recompiles,
  }
  print(f"{result['devices']}, mesh {result['mesh']}, {params:,} parameters, batch {b} pairs x 2 x {length} tokens")
  print(f"compile {compile_s:.2f} s | step {step_s * 1e3:.1f} ms (min {result['step_s_min'] * 1e3:.1f}) | "
        f"{result['tokens_per_s']:,.0f} tokens/s | {result['achieved_gflops']:.1f} GFLOP/s = "
        f"{result['percent_of_peak']:.1f}% of {_PEAK.value:.0f} | recompiles after warm-up: {recompiles}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
