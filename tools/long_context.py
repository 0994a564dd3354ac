"""Long packed rows on CPU: compiles a train step, proves no [rows, heads, L, L] fp32 buffer exists, trains.

  python tools/long_context.py --length 8192                       # configs/small.py dims, auto attention
  python tools/long_context.py --length 8192 --attention xla --compile_only   # the dense path, for contrast

Builds packed rows of synthetic pairs (lognormal lengths, median ~L/12 per sequence), compiles the Bradley-Terry
train step (AdamW), and reports XLA's compiled memory analysis, the largest buffer shape in the optimised HLO
and whether any buffer has two dimensions >= L (the [rows, heads, L, L] logits of the dense path). Then runs
--steps steps and prints the loss of each. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from jaxreward import loss, model as model_lib, optimizer, pipeline, state, tokenizer  # noqa: E402

SHAPE = re.compile(r"\b(f32|bf16|f16)\[([0-9,]+)\]")


def largest_buffers(hlo_text: str, length: int):
  """(largest float buffer in elements and its shape text, shapes with two dims >= length)."""
  biggest, square = (0, ""), set()
  for dtype, dims_text in SHAPE.findall(hlo_text):
    dims = [int(d) for d in dims_text.split(",")]
    size = int(np.prod(dims))
    if size > biggest[0]:
      biggest = (size, f"{dtype}[{dims_text}]")
    if sum(d >= length for d in dims) >= 2:
      square.add(f"{dtype}[{dims_text}]")
  return biggest, sorted(square)


def packed_batch(length: int, rows: int, vocab: int, seed: int = 0, median: float = 0.0) -> tuple[pipeline.Batch, int]:
  """As many synthetic pairs (lognormal lengths, median `median` or length / 12) as fill `rows` rows."""
  rng = np.random.default_rng(seed)
  lengths = []
  while True:
    pair = np.clip(rng.lognormal(np.log(median or length / 12), 0.7, size=2), 8, length).astype(int)
    if pipeline.first_fit_decreasing(np.concatenate(lengths + [pair]), length)[2] > rows:
      break
    lengths.append(pair)
  ids = [[rng.integers(2, vocab, size=int(n)).astype(np.int32) for n in pair] for pair in lengths]
  enc = tokenizer.Encoded(ids=ids, margin=np.zeros(len(ids), np.float32), pairs=[None] * len(ids))
  layout = pipeline.PackedLayout(length, 1, len(ids), pad_id=0)
  layout.row_buckets = [rows]
  return layout.collate(enc, np.arange(len(ids)), np.ones(len(ids))), int(np.sum(lengths))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--rows", type=int, default=2)
  p.add_argument("--hidden_size", type=int, default=128)  # configs/small.py
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--num_kv_heads", type=int, default=2)
  p.add_argument("--mlp_dim", type=int, default=384)
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--attention", default="auto")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--compile_only", action="store_true")
  args = p.parse_args(argv)

  cfg = model_lib.ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                              num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                              head_dim=args.hidden_size // args.num_heads, mlp_dim=args.mlp_dim,
                              tie_embeddings=True, attention=args.attention)
  batch_np, real_tokens = packed_batch(args.length, args.rows, args.vocab_size)
  batch = jax.tree.map(jnp.asarray, batch_np)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(model_lib.RewardModel(cfg, nnx.Rngs(0)), nnx.Param)
  train_cfg = dataclasses.make_dataclass("T", [])  # optimizer.make reads attributes of the config's train section
  for key, value in dict(learning_rate=1e-3, warmup_steps=0, end_learning_rate_factor=0.1, schedule="constant",
                         grad_clip_norm=1.0, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.01).items():
    setattr(train_cfg, key, value)
  tx, _ = optimizer.make(train_cfg, 100)

  def sum_loss(params, batch):
    sums = loss.batch_sums(*state.batch_rewards(nnx.merge(graphdef, params), batch), 0.0)
    return sums["loss"] / sums["count"]

  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(sum_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  (big_elems, big_shape), square = largest_buffers(compiled.as_text(), args.length)
  dense_logits = args.rows * args.num_heads * args.length ** 2 * 4
  result = {
      "device": jax.devices()[0].device_kind, "attention": args.attention, "length": args.length, "rows": args.rows,
      "pairs": int(batch_np.ends_GxBxP.shape[1]), "real_tokens": real_tokens,
      "parameters": int(sum(x.size for x in jax.tree.leaves(params))), "compile_s": round(compile_s, 1),
      "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 1), "argument_MiB": round(mem.argument_size_in_bytes / 2**20, 1),
      "dense_logits_per_layer_MiB": round(dense_logits / 2**20, 1), "largest_buffer": big_shape,
      "largest_buffer_MiB": round(big_elems * 4 / 2**20, 1), "LxL_buffers": square,
  }
  print(f"compiled in {compile_s:.1f} s: temp {result['temp_MiB']} MiB (one layer's dense fp32 logits would be "
        f"{result['dense_logits_per_layer_MiB']} MiB); largest buffer {big_shape}; L x L buffers: {square or 'none'}")
  if not args.compile_only:
    losses, times = [], []
    for _ in range(args.steps):
      t = time.perf_counter()
      params, opt_state, value = compiled(params, opt_state, batch)
      losses.append(float(value))
      times.append(time.perf_counter() - t)
      print(f"step {len(losses)}: loss {losses[-1]:.5f} in {times[-1]:.1f} s", flush=True)
    result.update(losses=[round(x, 6) for x in losses], step_s=round(float(np.median(times)), 2))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
