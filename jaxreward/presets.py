"""Named sharding presets: mesh sizes plus the rules table that maps model.py's logical axes onto them.

  presets.apply(config, "dp")                 # pure data parallel: every device holds the whole state.
  presets.apply(config, "fsdp")               # ZeRO-3: parameters, gradients and Adam state split over all devices.
  presets.apply(config, "fsdp_tp", tensor=4)  # FSDP over the rest, Megatron tensor parallel over 4 devices.

A preset only writes `config.mesh`; `--config.mesh.*` flags still override it. The batch is always split over
data x fsdp, so `train.batch_size` must be a multiple of their product.
"""

from __future__ import annotations

# The batch is split over every axis that does not split the model's width, so no device computes a
# duplicate of another's activations.
_BATCH = ("batch", ("data", "fsdp"))
_REPLICATED = [("norm", None), ("score", None), ("layers", None)]  # layers: the stacked blocks' axis.

PRESETS = {
    # Small models, or many devices over a slow interconnect: state is replicated, only gradients are reduced.
    "dp": {
        "sizes": {"data": -1, "fsdp": 1, "tensor": 1},
        "rules": [_BATCH, ("vocab", None), ("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
                  *_REPLICATED],
    },
    # Every matrix is split along its model-width (embed) axis; weights are all-gathered per layer as they are
    # used, so state memory falls as 1/devices while activations stay per-device.
    "fsdp": {
        "sizes": {"data": 1, "fsdp": -1, "tensor": 1},
        "rules": [_BATCH, ("vocab", None), ("embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
                  *_REPLICATED],
    },
    # FSDP on embed plus tensor parallelism on heads / MLP width / vocabulary: the width axes' activations are
    # split too, which is what lets an 8B model's attention and MLP intermediates fit at long sequence lengths.
    # kv_heads must divide by `tensor` (Llama-3: 8 KV heads, so tensor <= 8).
    "fsdp_tp": {
        "sizes": {"data": 1, "fsdp": -1, "tensor": 4},
        "rules": [_BATCH, ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                  ("mlp", "tensor"), *_REPLICATED],
    },
}


def apply(config, name: str, *, data: int | None = None, fsdp: int | None = None, tensor: int | None = None):
  """Sets `config.mesh` to preset `name` with optional axis sizes (-1 = the devices left); returns config."""
  if name not in PRESETS:
    raise ValueError(f"unknown sharding preset {name!r}; expected one of {', '.join(PRESETS)}")
  preset = PRESETS[name]
  sizes = dict(preset["sizes"])
  for axis, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
    if size is not None:
      sizes[axis] = size
  if name == "dp" and (sizes["fsdp"] != 1 or sizes["tensor"] != 1):
    raise ValueError("preset 'dp' replicates the model: fsdp and tensor must stay 1")
  if name == "fsdp" and sizes["tensor"] != 1:
    raise ValueError("preset 'fsdp' has no tensor axis; use 'fsdp_tp'")
  for axis, size in sizes.items():
    config.mesh[axis] = size
  config.mesh.rules = [tuple(rule) for rule in preset["rules"]]
  return config


def mesh_axes_of(name: str) -> dict:
  """Logical axis -> mesh axes (or None) of a preset, as a dict."""
  return dict(PRESETS[name]["rules"])
