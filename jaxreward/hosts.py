"""What the processes of a multi-host job do together: wait for each other, take host 0's word, and hold
their rows of each global batch.

Files in the work dir that every host needs but only host 0 may write (the trained tokenizer, the metrics
history on resume) follow one pattern: host 0 does the work, then a barrier, then the others read what it
left (or receive it: `from_main`); with one process those are no-ops.
"""

from __future__ import annotations

import functools
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxreward.configuration import ConfigError


def is_main() -> bool:
  return jax.process_index() == 0


def several() -> bool:
  return jax.process_count() > 1


def block(n: int) -> tuple[int, int]:
  """[start, stop): this host's contiguous share of n items (the hosts' shares in order cover them all)."""
  count, me = jax.process_count(), jax.process_index()
  return n * me // count, n * (me + 1) // count


def barrier(name: str) -> None:
  """Returns on every host once all hosts reached the barrier of this name."""
  if several():
    multihost_utils.sync_global_devices(name)


def from_main(data: bytes | None) -> bytes:
  """Host 0's `data` on every host (the others pass None): one collective for the size, one for the bytes."""
  if not several():
    return data
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data) if is_main() else 0)))
  if not size:
    return b""
  buffer = np.frombuffer(data, np.uint8) if is_main() else np.zeros(size, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def gather(x: np.ndarray) -> np.ndarray:
  """[processes, ...]: every host's `x` (same shape on all), on every host."""
  if not several():
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


@functools.lru_cache(maxsize=64)
def host_rows(batch_sharding, leading: int) -> np.ndarray:
  """The rows of a global batch's leading axis (pairs or packing groups) that this process's devices hold,
  ascending: what this host collates. A contiguous block when the host's devices form whole data x fsdp
  shards; with a tensor or fsdp group spanning hosts, each of them holds (a replica of) that group's rows.
  None (no mesh): every row."""
  if batch_sharding is None:
    return np.arange(leading)
  blocks = {index[0].indices(leading)[:2] for index in batch_sharding.addressable_devices_indices_map(
      (leading,)).values()}
  return np.concatenate([np.arange(start, stop) for start, stop in sorted(blocks)])


def global_leading(batch_sharding, local: int) -> int:
  """The global batch's leading size, from the `local` rows this host holds (`host_rows`: whole shards)."""
  size = len(batch_sharding.device_set)  # Every shard count along the leading axis divides it.
  shards = size // batch_sharding.shard_shape((size,))[0]
  held = len(host_rows(batch_sharding, size)) // (size // shards)
  return local * shards // held


def check_host_rows(plan, layout, batch_sharding) -> None:
  """Start-up check on batch 0: every device of this host holds exactly its rows of the global batch, and hosts
  holding the same rows (a tensor or fsdp group across hosts) hold the same values. One line if not."""
  indices, me = plan.indices(0), jax.process_index()
  leading, ones = layout.groups_of(len(indices)), np.ones(len(indices))
  placed = layout.collate(plan.enc, indices, ones, host_rows(batch_sharding, leading)).on_device(batch_sharding)
  size = batch_sharding.shard_shape((leading,))[0]
  digest_S = np.full(leading // size, -1, np.int64)  # A checksum of each shard this host holds, else -1.
  alone = {}  # (start, stop) -> those rows collated by themselves: the reference.
  for device, index in batch_sharding.addressable_devices_indices_map((leading,)).items():
    start, stop, _ = index[0].indices(leading)
    if (start, stop) not in alone:
      alone[start, stop] = jax.tree_util.tree_leaves_with_path(
          layout.collate(plan.enc, indices, ones, slice(start, stop)))
    checksum = 0
    for (path, want), field in zip(alone[start, stop], jax.tree.leaves(placed), strict=True):
      got = np.asarray(next(s.data for s in field.addressable_shards if s.device == device))
      if not np.array_equal(got, want):
        raise ConfigError(f"pipeline: device {device} of process {me} would get other values of "
                          f"{jax.tree_util.keystr(path)} rows {start}..{stop - 1} of batch 0 than the global batch has")
      checksum = zlib.crc32(np.ascontiguousarray(got).tobytes(), checksum)
    digest_S[start // size] = checksum
  gathered_PxS = gather(digest_S)
  for s in range(len(digest_S)):
    holders = [p for p in range(len(gathered_PxS)) if gathered_PxS[p, s] >= 0]
    differing = [p for p in holders if gathered_PxS[p, s] != gathered_PxS[holders[0], s]]
    if differing:
      raise ConfigError(f"pipeline: processes {holders[0]} and {differing[0]} lay out different values for rows "
                        f"{s * size}..{(s + 1) * size - 1} of batch 0, which devices of both hold: every host must "
                        "run the same code, config and data")
