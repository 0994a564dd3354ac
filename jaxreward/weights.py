"""Safetensors <-> sharded jax arrays, one slice or one tensor at a time.

On a pod every host must not read every full tensor of an 8B checkpoint (16 GB x N hosts from one file
server), nor gather the whole model in one place to export it. So:

  reader = Reader(folder)                      # model.safetensors or an index of shards; counts bytes read
  array = load(reader, entry, target)          # this host reads only the slices its devices hold
  value = gathered(array[, layer])             # one tensor (or one layer of a stacked one), on every host
  write(entries, out_dir)                      # shards of bounded size, each written when full, by process 0

An `entry` names where a parameter lives in the file: `(name, transpose)`, or for a parameter stacked over
layers (a leading layers axis) a list with one `(name, transpose)` per layer. `transpose` says the file
holds the tensor with its axes reversed (HF `nn.Linear` weights are [out, in]; our kernels [in, out]).
Only safetensors are read: pickle files (`*.bin`, `*.pt`) can execute code when loaded.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxreward import hosts
from jaxreward.configuration import ConfigError

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Export shards: each is built in host memory before it is written, so this bounds the exporting host's memory.
DEFAULT_SHARD_BYTES = 2 << 30


class Reader:
  """Lazy slice reader over `model.safetensors` or an index of shards.

  `bytes_read` is the sum of the sizes (in the file's dtype) of every slice returned so far: what this
  process asked of the file system. The files are memory-mapped, so the pages touched are those bytes
  rounded out to whole pages.
  """

  def __init__(self, folder: str):
    self.folder = folder
    self.bytes_read = 0
    index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"hf: {index}: not a safetensors index ({type(e).__name__}: {e})") from None
      self.where = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, "numpy") as f:
        self.where = {name: single for name in f.keys()}
    else:
      pickles = sorted({os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(folder, pat))})
      if pickles:
        raise ConfigError(f"hf: {folder} holds only pickle weights ({', '.join(pickles)}); they can run code "
                          "when loaded and are refused: convert them to safetensors first")
      raise ConfigError(f"hf: {folder} has no {SINGLE} or {INDEX}")
    missing = sorted({p for p in self.where.values() if not os.path.isfile(p)})
    if missing:
      raise ConfigError(f"hf: shard {missing[0]} named in the index does not exist")
    self._open = {}

  def _slice(self, name: str):
    path = self.where[name]
    if path not in self._open:
      self._open[path] = safe_open(path, "numpy")
    return self._open[path].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """The part `index` of tensor `name`, read without reading the rest."""
    value = self._slice(name)[index]
    self.bytes_read += value.nbytes
    return value


def _bounds(index, shape) -> tuple[tuple[int, int, int], ...]:
  """A device's index (slices, maybe open-ended) as hashable (start, stop, step) per axis."""
  return tuple(s.indices(n) for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape))


def _read_one(reader: Reader, name: str, transpose: bool, bounds, dtype) -> np.ndarray:
  file_index = tuple(slice(*b) for b in (bounds[::-1] if transpose else bounds))
  value = reader.read(name, file_index)
  return np.ascontiguousarray(value.T if transpose else value, dtype=dtype)


def check_shapes(reader: Reader, entry, shape: tuple[int, ...]) -> None:
  """ConfigError when the file's tensor(s) for `entry` do not fit a parameter of `shape`."""
  stacked = isinstance(entry, list)
  if stacked and len(entry) != shape[0]:
    raise ValueError(f"{len(entry)} tensors named for a parameter stacked over {shape[0]} layers")
  want = tuple(shape[1:] if stacked else shape)
  for name, transpose in entry if stacked else [entry]:
    have = reader.shape(name)
    if (have[::-1] if transpose else have) != want:
      raise ConfigError(f"hf: {reader.folder}: {name} has shape {list(have)}; the model expects "
                        f"{list(want[::-1] if transpose else want)}")


def load(reader: Reader, entry, target: jax.Array) -> jax.Array:
  """A new array like `target` (shape, dtype, sharding) holding the file's values for `entry`.

  This process reads only the slices that its own devices hold, each once however many of its devices
  hold it (replicated axes), converting each slice to the target dtype. For a stacked parameter the
  first axis of a device's index selects layers: the slice of each of those layers' tensors is read.
  """
  shape, dtype = tuple(target.shape), target.dtype
  check_shapes(reader, entry, shape)
  slices = {}

  def read(index):
    bounds = _bounds(index, shape)
    if bounds not in slices:
      if isinstance(entry, list):
        slices[bounds] = np.stack([_read_one(reader, *entry[layer], bounds[1:], dtype)
                                   for layer in range(*bounds[0])])
      else:
        slices[bounds] = _read_one(reader, *entry, bounds, dtype)
    return slices[bounds]

  return jax.make_array_from_callback(shape, target.sharding, read)


@jax.jit
def _layer(x, i):
  return x[i]


def gathered(x: jax.Array, layer: int | None = None) -> np.ndarray:
  """The whole of `x` (or of its `layer`-th slice along axis 0) as a numpy array on every process.

  Every process of a multi-host job must call it (it is a collective); only this one tensor is ever whole.
  """
  if layer is not None:
    x = _layer(x, layer)
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def plan(entries: list[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list[int]]:
  """Positions of `entries` (name, shape, dtype) grouped into consecutive shards of at most
  `max_shard_bytes` (a larger tensor gets a shard of its own)."""
  shards, size = [], 0
  for i, (_, shape, dtype) in enumerate(entries):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if not shards or (size + nbytes > max_shard_bytes and size > 0):
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += nbytes
  return shards


def write(entries: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]], out_dir: str,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None) -> list[str]:
  """Writes tensors `(name, shape, dtype, fetch)` as `model.safetensors`, or as numbered shards plus
  `model.safetensors.index.json` when they exceed `max_shard_bytes`; returns the files' names.

  `fetch()` is called once per tensor, in order, on every process (it may be a collective, e.g. `gathered`);
  process 0 alone writes. Host memory holds at most one shard's tensors.
  """
  entries = list(entries)
  shards = plan([(n, s, d) for n, s, d, _ in entries], max_shard_bytes)
  names = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  writer = hosts.is_main()
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  weight_map, total = {}, 0
  for file_name, positions in zip(names, shards):
    tensors = {}
    for i in positions:
      name, shape, dtype, fetch = entries[i]
      value = np.ascontiguousarray(fetch(), dtype=dtype)
      if value.shape != tuple(shape):
        raise ValueError(f"{name}: fetched shape {value.shape}, planned {tuple(shape)}")
      tensors[name] = value
      weight_map[name] = file_name
      total += value.nbytes
    if writer:
      save_file(tensors, os.path.join(out_dir, file_name), metadata=metadata)
    del tensors
  if writer and len(shards) > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  return names
