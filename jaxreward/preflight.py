"""The checks that need the resolved model, run after the data is read and before any device work.

`configuration.validate` checks each setting on its own; these check settings against what they meet: an
imported model's positions and weight files, and the machine's memory. Each failure is one ConfigError line.
"""

from __future__ import annotations

import glob
import json
import os

import jax
from safetensors import SafetensorError, safe_open

from jaxreward import memory, model as model_lib
from jaxreward.configuration import ConfigError

# An estimate above the device's usable memory by more than this factor stops the run; between 1x and this,
# it warns (the activation part is an estimate, see memory.py).
FAR_ABOVE = 1.5


def check_init_from(config, log) -> None:
  """An imported model's weight files and positions, before its data is read."""
  folder = config.model.init_from
  check_weights(folder)
  try:
    with open(os.path.join(folder, "config.json")) as f:
      hf_config = json.load(f)
  except (OSError, ValueError):
    return  # hf.model_config names the problem in its own words.
  if isinstance(hf_config, dict):
    check_positions(config, hf_config, log)


def check_positions(config, hf_config: dict, log) -> None:
  """data.max_length against an imported model's max_position_embeddings (packed rows restart positions)."""
  limit = hf_config.get("max_position_embeddings")
  length = config.data.max_length
  if not isinstance(limit, int) or length <= limit:
    return
  scaling = hf_config.get("rope_scaling") or {}
  where = f"{config.model.init_from}/config.json"
  if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    log(f"warning: data.max_length={length} exceeds max_position_embeddings={limit} of {where}; its RoPE scaling "
        f"({scaling.get('rope_type', scaling.get('type'))}) may carry it, untested at this length")
    return
  raise ConfigError(f"config: data.max_length={length} exceeds max_position_embeddings={limit} of {where}: the "
                    f"model never saw positions past {limit}; set data.max_length <= {limit}")


def check_weights(folder: str) -> None:
  """Every safetensors file of `folder` has a complete header and data (a cut download fails here)."""
  for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    try:
      with safe_open(path, "numpy"):
        pass
    except (SafetensorError, OSError) as e:
      raise ConfigError(f"hf: {path}: not a complete safetensors file ({e}); it may be truncated: download or "
                        "convert it again") from None


def device_memory() -> tuple[str, float]:
  """(what, usable bytes) of one local device: its allocator limit, or host memory shared by CPU devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return device.device_kind, float(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return f"{device.platform} (host memory shared by {jax.local_device_count()} device(s))", host / jax.local_device_count()


def check_memory(config, model_cfg: model_lib.ModelConfig, mesh_shape: dict, log) -> dict:
  """memory.py's per-device estimate against this machine's; returns the estimate."""
  est = memory.from_config(config, model_cfg, mesh_shape)
  what, capacity = device_memory()
  usable = memory.USABLE * capacity
  if est["total"] <= usable:
    return est
  gib = lambda x: f"{x / memory.GiB:,.1f} GiB"
  message = (f"memory: the run needs an estimated {gib(est['total'])} per device ({gib(est['activations'])} of "
             f"activations) but {what} has {gib(capacity)}; lower data.max_length or train.batch_size, raise "
             "train.grad_accum_steps, set model.remat=full (or save_matmuls) or model.dtype=bfloat16, or shard over "
             "more devices (mesh.fsdp); python tools/memory.py prints the estimate for any setting")
  if est["total"] > FAR_ABOVE * usable:
    raise ConfigError(message)
  log(f"warning: {message}")
  return est
