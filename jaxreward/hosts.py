"""What the processes of a multi-host job do together: wait for each other, and take host 0's word.

Files in the work dir that every host needs but only host 0 may write (the trained tokenizer, the metrics
history on resume) follow one pattern: host 0 does the work, then a barrier, then the others read what it
left (or receive it: `from_main`). Every function is a no-op with one process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


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
