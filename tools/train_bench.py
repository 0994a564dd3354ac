"""Train-step benchmark per layout (unpacked / packed) and attention implementation, with MFU.

  python tools/train_bench.py                                    # medium width (d 2048, 4 layers, bf16, seq 2048)
  python tools/train_bench.py --hidden_size 64 --num_layers 2 --num_heads 4 --num_kv_heads 2 --length 128 \
      --pairs 2 --dtype float32 --variants U-xla,P-blockwise     # a tiny shape (what the CPU test runs)

Each variant (U = one sequence per row, every token real; P = packed rows of synthetic pairs with lognormal
lengths) builds the project's sharded train state and jitted train step (AdamW) and reports the median step
time after warm-up, real tokens/s, MFU = (6·N_matmul·real tokens + causal attention FLOPs 6·layers·heads·
head_dim·Σ n(n+1) over the sequences) / step time / --peak_tflops (989 = H100 SXM dense bf16), XLA's own FLOP
count, and memory: the compiled step's arguments + temporaries + outputs (less donated buffers), and the
device's peak bytes in use so far where it reports them.
A failing variant prints its error and the rest still run. The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import traceback

from absl import app, flags
import jax
import numpy as np

from jaxreward import allocator, configuration, model as model_lib, pipeline, sharding, state, synthetic
from jaxreward.configuration import defaults


def matmul_parameters(cfg: model_lib.ModelConfig) -> int:
  """Parameters that take part in a matmul per token: the blocks and the score head (the embedding is a
  gather and the LM head is never applied)."""
  return cfg.num_layers * _block_parameters(cfg) + cfg.hidden_size


def _block_parameters(cfg: model_lib.ModelConfig) -> int:
  d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return 2 * d * n * h + 2 * d * k * h + 3 * d * f


def model_flops(cfg: model_lib.ModelConfig, sequence_lengths) -> float:
  """Matmul and causal-attention FLOPs of one training step (forward + backward = 3x forward) as the model
  computes them: every block on every token, except that the last block's output projection, MLP and the
  score head run on each sequence's read position only (model.Backbone)."""
  n = np.asarray(sequence_lengths, np.float64)
  d, nh, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  read_only = d * nh * h + 3 * d * f  # The last block's o_proj and MLP.
  per_token = (cfg.num_layers * _block_parameters(cfg) - read_only) * float(n.sum())
  per_read = (read_only + d) * len(n)
  attention = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float(np.sum(n * (n + 1)))
  return 6.0 * (per_token + per_read) + attention


def unpacked_batch(pairs: int, length: int, vocab: int):
  """One pair per group, one full-length sequence per row (pipeline.BucketedLayout's shape)."""
  rng = np.random.default_rng(0)
  batch = pipeline.Batch(tokens_GxRxL=rng.integers(2, vocab, size=(pairs, 2, length)).astype(np.int32),
                         ends_GxBxP=np.tile(np.array([[[length - 1, 2 * length - 1]]], np.int32), (pairs, 1, 1)),
                         weight_GxB=np.ones((pairs, 1), np.float32), margin_GxB=np.zeros((pairs, 1), np.float32))
  return batch, [length] * (2 * pairs)


def run_variant(name: str, base: model_lib.ModelConfig, args, mesh, rule_table) -> dict:
  layout, attention = name.split("-", 1)
  cfg = dataclasses.replace(base, attention=attention)
  if layout == "P":
    batch_np, _ = synthetic.packed_batch(args.length, 2 * args.pairs, cfg.vocab_size, median=args.packed_median)
    seg = batch_np.segments_GxRxL
    # Sequence lengths from the segment ids (each row's segments 1..m are contiguous runs).
    lengths = [int(c) for row in seg.reshape(-1, seg.shape[-1]) for c in np.bincount(row)[1:] if c]
  else:
    batch_np, lengths = unpacked_batch(args.pairs, args.length, cfg.vocab_size)
  train_cfg = defaults().train
  train_cfg.seed, train_cfg.center_rewards_coef, train_cfg.grad_accum_steps = 0, 0.0, 1
  trainer = state.Trainer(cfg, train_cfg, mesh, rule_table, 1000)
  train_state = trainer.state
  batch = batch_np.on_device(trainer.batch_sharding)
  t = time.perf_counter()
  compiled = trainer.train_step.lower(train_state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  for _ in range(args.warmup):
    train_state, metrics = compiled(train_state, batch)
  first = jax.device_get(metrics)
  times, cpu_before = [], os.times()
  for _ in range(args.steps):
    t = time.perf_counter()
    train_state, metrics = compiled(train_state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  cpu = os.times()
  flops = model_flops(cfg, lengths)
  stats = jax.devices()[0].memory_stats() or {}
  slots = int(np.prod(batch_np.tokens_GxRxL.shape))
  return {
      "variant": name, "compile_s": round(compile_s, 2), "step_ms": round(1e3 * step_s, 2),
      # Process CPU time per step, all threads: steadier than wall time on a shared machine; "sys" is mostly
      # page faults (jaxreward/allocator.py).
      "cpu_ms": round(1e3 * (cpu.user + cpu.system - cpu_before.user - cpu_before.system) / args.steps, 1),
      "sys_ms": round(1e3 * (cpu.system - cpu_before.system) / args.steps, 1),
      "real_tokens": int(sum(lengths)), "slot_tokens": slots, "real_tokens_per_s": round(sum(lengths) / step_s),
      "model_TFLOP_per_step": flops / 1e12, "MFU": flops / step_s / (args.peak_tflops * 1e12),
      "xla_TFLOP_per_step": float(cost.get("flops", 0.0)) / 1e12 if cost else None,
      # The device's peak since the process started (it never resets, so a later variant shows at least an
      # earlier one's peak); the compiled step's own footprint is the per-variant figure.
      "peak_so_far_GiB": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
      "compiled_GiB": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                       - mem.alias_size_in_bytes) / 2**30 if mem else None,
      "loss_per_pair": float(first["loss"] / max(first["count"], 1.0)), "grad_norm": float(first["grad_norm"]),
  }


_FLAGS = {
    "hidden_size": flags.DEFINE_integer("hidden_size", 2048, "model width"),
    "num_layers": flags.DEFINE_integer("num_layers", 4, "layers"),
    "num_heads": flags.DEFINE_integer("num_heads", 32, "query heads"),
    "num_kv_heads": flags.DEFINE_integer("num_kv_heads", 8, "key/value heads"),
    "mlp_dim": flags.DEFINE_integer("mlp_dim", 0, "0 = 4 x hidden_size"),
    "vocab_size": flags.DEFINE_integer("vocab_size", 32768, "vocabulary"),
    "dtype": flags.DEFINE_string("dtype", "bfloat16", "compute dtype"),
    "remat": flags.DEFINE_enum("remat", "none", configuration.REMAT_POLICIES, "what each block's backward recomputes"),
    "scan_layers": flags.DEFINE_bool("scan_layers", False, "blocks stacked and applied in one scan"),
    "length": flags.DEFINE_integer("length", 2048, "tokens per row"),
    "pairs": flags.DEFINE_integer("pairs", 4, "unpacked: pairs x 2 rows; packed rows: the same count"),
    "packed_median": flags.DEFINE_float("packed_median", 350.0, "median synthetic sequence length, packed"),
    "variants": flags.DEFINE_string("variants", "P-cudnn,U-cudnn,P-xla,U-xla,P-blockwise,U-blockwise",
                                    "LAYOUT-ATTENTION pairs, comma-separated"),
    "steps": flags.DEFINE_integer("steps", 5, "timed steps"),
    "warmup": flags.DEFINE_integer("warmup", 2, "untimed steps"),
    "peak_tflops": flags.DEFINE_float("peak_tflops", 989.0, "the device's peak TFLOP/s for MFU"),
    "json": flags.DEFINE_string("json", "", "also write the results here"),
}


def main(argv) -> None:
  del argv
  args = types.SimpleNamespace(**{name: flag.value for name, flag in _FLAGS.items()})
  base = model_lib.ModelConfig(
      vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
      num_kv_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads,
      mlp_dim=args.mlp_dim or 4 * args.hidden_size, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
      dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers)
  mesh_cfg = defaults().mesh
  mesh_cfg.data = 1
  mesh, rule_table = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"{device}, jax {jax.__version__}, matmul precision {jax.config.jax_default_matmul_precision or 'default'}")
  print(f"model: d {base.hidden_size}, {base.num_layers} layers, {base.num_heads}/{base.num_kv_heads} heads x "
        f"{base.head_dim}, mlp {base.mlp_dim}, {base.dtype}; {matmul_parameters(base):,} matmul parameters; "
        f"rows of {args.length} tokens, {2 * args.pairs} rows")
  results = []
  for name in args.variants.split(","):
    try:
      results.append(run_variant(name, base, args, mesh, rule_table))
    except Exception as e:  # noqa: BLE001  (one kernel failing on this device must not hide the others)
      traceback.print_exc()
      results.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    r = results[-1]
    if "error" in r:
      print(f"{name:14s} ERROR {r['error'][:200]}", flush=True)
    else:
      peak = "" if r["peak_so_far_GiB"] is None else f" (device peak so far {r['peak_so_far_GiB']:.2f})"
      print(f"{name:14s} step {r['step_ms']:9.1f} ms  real {r['real_tokens_per_s']:>10,} tok/s  "
            f"MFU {r['MFU']:6.1%}  cpu {r['cpu_ms']:,.0f} ms (sys {r['sys_ms']:,.0f})  "
            f"mem {r['compiled_GiB']:6.2f} GiB{peak}  compile {r['compile_s']:5.1f} s  "
            f"loss {r['loss_per_pair']:.4f}  ({r['real_tokens']}/{r['slot_tokens']} real)", flush=True)
  out = {"device": device, "jax": jax.__version__, "model": dataclasses.asdict(base), "length": args.length,
         "pairs": args.pairs, "peak_tflops": args.peak_tflops, "variants": results}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  allocator.reexec()  # As the commands do, so the figures are what a run gets.
  app.run(main)
