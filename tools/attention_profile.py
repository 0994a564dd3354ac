"""Times attention forward + backward per implementation and block size on this machine's default device.

  python tools/attention_profile.py --length 2048 --rows 2 --heads 4 --kv_heads 2 --head_dim 64
  python tools/attention_profile.py --length 256 --rows 16 --packed   # the autoj shape: compare xla vs blockwise

Prints milliseconds per call (median of --repeats after one warm-up) and the compiled temp memory. Used to
pick attention.BLOCK; rerun it on the machine you tune for and name its CPU with the figures.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreward import attention


def packed_segments(rng, rows: int, length: int):
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos, sid = 0, 1
    while pos < length:  # Lognormal lengths around length / 6, as real preference pairs pack.
      n = int(np.clip(rng.lognormal(np.log(length / 6), 0.6), 8, length - pos))
      seg[r, pos:pos + n] = sid
      pos, sid = pos + n, sid + 1
  return jnp.asarray(seg)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--rows", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--packed", action="store_true")
  p.add_argument("--blocks", default="128,256,512")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_xla", action="store_true", help="the dense path needs rows·heads·L²·8 bytes")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(args.rows, args.length, n, args.head_dim)), jnp.float32)
             for n in (args.heads, args.kv_heads, args.kv_heads))
  seg = packed_segments(rng, args.rows, args.length) if args.packed else None
  variants = {} if args.skip_xla else {"xla": lambda q, k, v: attention.attend(q, k, v, seg, "xla")}
  for block in (int(b) for b in args.blocks.split(",")):
    variants[f"blockwise/{block}"] = lambda q, k, v, block=block: attention.blockwise_attention(q, k, v, seg, block)
  print(f"{jax.devices()[0].device_kind}: rows {args.rows} x L {args.length}, heads {args.heads}/{args.kv_heads} x "
        f"{args.head_dim}, {'packed' if args.packed else 'unpacked'}")
  for name, fn in variants.items():
    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - t)
    mem = compiled.memory_analysis()
    print(f"  {name:15s} {1e3 * np.median(times):9.1f} ms   temp {mem.temp_size_in_bytes / 2**20:9.1f} MiB")


if __name__ == "__main__":
  main()
