"""Times attention forward + backward per implementation and block size on this machine's default device.

  python tools/attention_profile.py --length 2048 --rows 2 --heads 4 --kv_heads 2 --head_dim 64
  python tools/attention_profile.py --length 256 --rows 16 --packed   # the autoj shape: compare xla vs blockwise

Prints milliseconds per call (median of --repeats after one warm-up) and the compiled temp memory. Used to
pick attention.BLOCK; rerun it on the machine you tune for and name its CPU with the figures.
"""

from __future__ import annotations

import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxreward import allocator, attention


def packed_segments(rng, rows: int, length: int):
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos, sid = 0, 1
    while pos < length:  # Lognormal lengths around length / 6, as real preference pairs pack.
      n = int(np.clip(rng.lognormal(np.log(length / 6), 0.6), 8, length - pos))
      seg[r, pos:pos + n] = sid
      pos, sid = pos + n, sid + 1
  return jnp.asarray(seg)


_LENGTH = flags.DEFINE_integer("length", 2048, "tokens per row")
_ROWS = flags.DEFINE_integer("rows", 2, "rows")
_HEADS = flags.DEFINE_integer("heads", 4, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "key/value heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head width")
_PACKED = flags.DEFINE_bool("packed", False, "rows of several segments (lognormal lengths)")
_BLOCKS = flags.DEFINE_string("blocks", "128,256,512", "blockwise block sizes to time, comma-separated")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per variant")
_SKIP_XLA = flags.DEFINE_bool("skip_xla", False, "the dense path needs rows·heads·L²·8 bytes")


def main(argv) -> None:
  del argv
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(_ROWS.value, _LENGTH.value, n, _HEAD_DIM.value)), jnp.float32)
             for n in (_HEADS.value, _KV_HEADS.value, _KV_HEADS.value))
  seg = packed_segments(rng, _ROWS.value, _LENGTH.value) if _PACKED.value else None
  variants = {} if _SKIP_XLA.value else {"xla": lambda q, k, v: attention.attend(q, k, v, seg, "xla")}
  for block in (int(b) for b in _BLOCKS.value.split(",")):
    variants[f"blockwise/{block}"] = lambda q, k, v, block=block: attention.blockwise_attention(q, k, v, seg, block)
  print(f"{jax.devices()[0].device_kind}: rows {_ROWS.value} x L {_LENGTH.value}, heads {_HEADS.value}/{_KV_HEADS.value} x "
        f"{_HEAD_DIM.value}, {'packed' if _PACKED.value else 'unpacked'}")
  for name, fn in variants.items():
    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - t)
    mem = compiled.memory_analysis()
    print(f"  {name:15s} {1e3 * np.median(times):9.1f} ms   temp {mem.temp_size_in_bytes / 2**20:9.1f} MiB")


if __name__ == "__main__":
  allocator.reexec()  # As the commands do, so the figures are what a run gets.
  app.run(main)
