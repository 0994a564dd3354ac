"""Compile time and CPU step time of configs/large.py's shape (shrunk width, full depth): blocks unrolled vs in one
scan (model.scan_layers), per remat policy (model.remat).

  python tools/compile_time.py                                  # 32 layers, d 128, 8/2 heads, seq 128, 4 pairs
  python tools/compile_time.py --num_layers 8 --variants unrolled-full,scan-full

The model is --config's (default configs/large.py: its depth unless --num_layers, its attention and rules table) at
the width the flags give. Each variant builds the project's train state and jitted train step (state.Trainer: AdamW,
one device) and reports: `init`, building the state (its own jit: compile + run); `trace`, tracing and lowering
the train step; `compile`, XLA compiling it; `step`, the median of --steps steps after one warm-up. Variants are
{unrolled,scan}-{none,save_matmuls,full}; large itself runs scan-full. Times depend on the machine's load: print
`uptime` and the CPU model beside them. The last line is one JSON object.

Measured with the defaults on 2 AMD EPYC cores (load average 3.2), init / trace / compile / step in seconds:
unrolled-full 31.9 / 2.73 / 13.7 / 1.61; scan-none 2.97 / 0.53 / 3.38 / 1.50; scan-save_matmuls 3.07 / 0.34 / 5.76 /
2.09; scan-full 4.81 / 0.52 / 7.68 / 2.10. Under load 11-24 the same run gave compile 171 s unrolled-full vs 32-39 s
scanned; unrolled-none, run right after: 32.3 / 4.55 / 19.8 / 2.61. Step times on this shared machine vary by
~30% between runs: the scan is for compile time, not a measured step-time gain.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import types

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from jaxreward import model as model_lib, pipeline, sharding, state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/large.py", "Run configuration file.", lock_config=True)
_FLAGS = {
    "num_layers": flags.DEFINE_integer("num_layers", 0, "layers; 0 = the config's"),
    "hidden_size": flags.DEFINE_integer("hidden_size", 128, "model width"),
    "num_heads": flags.DEFINE_integer("num_heads", 8, "query heads"),
    "num_kv_heads": flags.DEFINE_integer("num_kv_heads", 2, "key/value heads"),
    "mlp_dim": flags.DEFINE_integer("mlp_dim", 448, "SwiGLU width (large's 3.5 x hidden_size)"),
    "vocab_size": flags.DEFINE_integer("vocab_size", 512, "vocabulary"),
    "length": flags.DEFINE_integer("length", 128, "tokens per row"),
    "pairs": flags.DEFINE_integer("pairs", 4, "pairs per step (2 rows each)"),
    "dtype": flags.DEFINE_string("dtype", "float32", "compute dtype (large computes in bfloat16; CPUs time float32)"),
    "steps": flags.DEFINE_integer("steps", 3, "timed steps after one warm-up"),
    "variants": flags.DEFINE_string("variants", "unrolled-full,scan-none,scan-save_matmuls,scan-full",
                                    "LAYOUT-REMAT pairs, comma-separated; LAYOUT is unrolled or scan"),
}


def batch_of(pairs: int, length: int, vocab: int) -> pipeline.Batch:
  """`pairs` pairs, one full-length sequence per row (no packing: the shape large trains on with xla attention)."""
  rng = np.random.default_rng(0)
  return pipeline.Batch(
      tokens_GxRxL=rng.integers(2, vocab, size=(pairs, 2, length)).astype(np.int32),
      ends_GxBxP=np.tile(np.arange(2, dtype=np.int32) * length + length - 1, (pairs, 1, 1)),
      weight_GxB=np.ones((pairs, 1), np.float32), margin_GxB=np.zeros((pairs, 1), np.float32))


def run_variant(name: str, base: model_lib.ModelConfig, config, mesh, rule_table, batch, steps: int) -> dict:
  layout, remat = name.split("-", 1)
  cfg = dataclasses.replace(base, scan_layers=layout == "scan", remat=remat)
  t0 = time.perf_counter()
  trainer = state.Trainer(cfg, config.train, mesh, rule_table, num_steps=100)
  jax.block_until_ready(trainer.state)
  t1 = time.perf_counter()
  device_batch = batch.on_device(trainer.batch_sharding)
  lowered = trainer.train_step.lower(trainer.state, device_batch)
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  train_state, times = trainer.state, []
  for _ in range(steps + 1):
    start = time.perf_counter()
    train_state, metrics = compiled(train_state, device_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"variant": name, "init_s": round(t1 - t0, 2), "trace_s": round(t2 - t1, 2), "compile_s": round(t3 - t2, 2),
          "step_s": round(statistics.median(times[1:]), 3), "loss": float(metrics["loss"] / metrics["count"])}


def main(argv) -> None:
  del argv
  args = types.SimpleNamespace(**{name: flag.value for name, flag in _FLAGS.items()})
  config = _CONFIG.value
  m = config.model
  m.num_layers = args.num_layers or m.num_layers
  m.hidden_size, m.num_heads, m.num_kv_heads = args.hidden_size, args.num_heads, args.num_kv_heads
  m.head_dim, m.mlp_dim, m.dtype = args.hidden_size // args.num_heads, args.mlp_dim, args.dtype
  config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
  base = model_lib.ModelConfig.from_config(m, args.vocab_size)
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  batch = batch_of(args.pairs, args.length, args.vocab_size)
  print(f"model: {base.num_layers} layers, d {base.hidden_size}, {base.num_heads}/{base.num_kv_heads} heads x "
        f"{base.head_dim}, mlp {base.mlp_dim}, {base.dtype}, attention {base.attention}; {args.pairs} pairs x 2 x "
        f"{args.length} tokens; {jax.devices()[0].device_kind}, jax {jax.__version__}")
  results = []
  for name in args.variants.split(","):
    results.append(run_variant(name, base, config, mesh, rule_table, batch, args.steps))
    r = results[-1]
    print(f"{r['variant']:>18}: init {r['init_s']:6.2f} s  trace {r['trace_s']:6.2f} s  compile {r['compile_s']:6.2f} s"
          f"  step {r['step_s']:6.3f} s  loss {r['loss']:.5f}", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
