"""Long packed rows on CPU: compiles a train step, proves no [rows, heads, L, L] fp32 buffer exists, trains.

  python tools/long_context.py --length 8192                       # configs/small.py dims, auto attention
  python tools/long_context.py --length 8192 --attention xla --compile_only   # the dense path, for contrast

Builds packed rows of synthetic pairs (lognormal lengths, median ~L/12 per sequence), compiles the Trainer's
train step (state.Trainer, one device, AdamW), and reports XLA's compiled memory analysis, the largest buffer shape in the optimised HLO
and whether any buffer has two dimensions >= L (the [rows, heads, L, L] logits of the dense path). Then runs
--steps steps and prints the loss of each. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import re
import time
import types

from absl import app, flags
import jax
import numpy as np

from jaxreward import model as model_lib, sharding, state, synthetic
from jaxreward.configuration import defaults

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


_LENGTH = flags.DEFINE_integer("length", 8192, "tokens per packed row")
_ROWS = flags.DEFINE_integer("rows", 2, "packed rows")
_HIDDEN_SIZE = flags.DEFINE_integer("hidden_size", 128, "model width (configs/small.py)")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "layers")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "query heads")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "key/value heads")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 384, "feed-forward width")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "vocabulary")
_ATTENTION = flags.DEFINE_string("attention", "auto", "model.attention")
_STEPS = flags.DEFINE_integer("steps", 3, "train steps after compiling")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "stop after the memory analysis")


def main(argv) -> None:
  del argv
  args = types.SimpleNamespace(**{name: flags.FLAGS[name].value for name in (
      "length", "rows", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size",
      "attention", "steps", "compile_only")})
  cfg = model_lib.ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                              num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                              head_dim=args.hidden_size // args.num_heads, mlp_dim=args.mlp_dim,
                              tie_embeddings=True, attention=args.attention)
  batch_np, real_tokens = synthetic.packed_batch(args.length, args.rows, args.vocab_size)
  config = defaults()
  config.mesh.data = 1
  t_cfg = config.train
  t_cfg.learning_rate, t_cfg.warmup_steps, t_cfg.schedule, t_cfg.center_rewards_coef = 1e-3, 0, "constant", 0.0
  trainer = state.Trainer(cfg, t_cfg, sharding.make_mesh(config.mesh), sharding.rules(config.mesh), 100)
  train_state, batch = trainer.state, batch_np.on_device(trainer.batch_sharding)
  t = time.perf_counter()
  compiled = trainer.train_step.lower(train_state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  (big_elems, big_shape), square = largest_buffers(compiled.as_text(), args.length)
  dense_logits = args.rows * args.num_heads * args.length ** 2 * 4
  result = {
      "device": jax.devices()[0].device_kind, "attention": args.attention, "length": args.length, "rows": args.rows,
      "pairs": int(batch_np.ends_GxBxP.shape[1]), "real_tokens": real_tokens,
      "parameters": trainer.num_parameters(), "compile_s": round(compile_s, 1),
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
      train_state, metrics = compiled(train_state, batch)
      metrics = jax.device_get(metrics)
      losses.append(float(metrics["loss"] / metrics["count"]))
      times.append(time.perf_counter() - t)
      print(f"step {len(losses)}: loss {losses[-1]:.5f} in {times[-1]:.1f} s", flush=True)
    result.update(losses=[round(x, 6) for x in losses], step_s=round(float(np.median(times)), 2))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
