"""Per-device memory of a training run, estimated before any device is touched.

State (parameters, gradients, Adam moments) is exact: the abstract model is built with `nnx.eval_shape`, each
parameter's logical axes go through the run's rules table, and its shard is its shape divided by the mesh
sizes of the axes that split it, which is what `NamedSharding` places on a device. Activations are an
estimate of what the backward pass keeps alive (see `_activation_bytes_per_token`); XLA fuses and frees
differently per backend. It has not been checked on a GPU or TPU: on CPU, XLA's `memory_analysis()` is no
reference (its temp bytes barely move with remat, 680 vs 708 MiB on a 4-layer model, though the recompute
happens), so compare with a real device's `compiled.memory_analysis()` before trusting the last GiB.

  python tools/memory.py --config configs/large.py [--config.mesh.fsdp=16] [--devices 64]
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import nnx

from jaxreward import attention, model as model_lib, optimizer, sharding

GiB = 1 << 30
# Per-chip memory. XLA needs room for its own buffers and fragmentation, so a run "fits" when the estimate
# stays under USABLE of it.
ACCELERATORS = (
    ("NVIDIA H100 80GB", 80e9),
    ("NVIDIA H200 141GB", 141e9),
    ("NVIDIA A100 80GB", 80e9),
    ("NVIDIA A100 40GB", 40e9),
    ("NVIDIA L4 24GB", 24e9),
    ("TPU v4 (32 GiB/chip)", 32 * GiB),
    ("TPU v5e (16 GiB/chip)", 16 * GiB),
    ("TPU v5p (95 GiB/chip)", 95 * GiB),
    ("TPU v6e (32 GiB/chip)", 32 * GiB),
)
USABLE = 0.9
STATE_KEYS = ("parameters", "gradients", "adam_state", "grad_accumulator")
TRANSIENT_KEYS = ("activations", "gathered_weights")


def abstract_params(model_cfg: model_lib.ModelConfig):
  """Flat [(path, logical_axes, shape, dtype)] of the model's parameters, with no device or mesh."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: model_lib.RewardModel(model_cfg, nnx.Rngs(0)))
  rows = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    value = var.get_value()
    axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    rows.append((".".join(str(p) for p in path), tuple(axes), tuple(value.shape), np.dtype(value.dtype)))
  return rows


def shard_shape(shape, logical_axes, mesh_shape: dict, rule_table) -> tuple:
  """The per-device block of an array of `shape` whose dims carry `logical_axes` under `rule_table`."""
  table = dict(rule_table)
  out = []
  for dim, name in zip(shape, logical_axes):
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    ways = math.prod(int(mesh_shape[a]) for a in mesh_axes)
    out.append(-(-dim // ways))  # Uneven splits pad the last shard up to the same size.
  return tuple(out)


def _activation_bytes_per_token(cfg: model_lib.ModelConfig, tensor: int, length: int,
                                kernel: str) -> tuple[int, int, int]:
  """(bytes a block saves per token for its backward pass, bytes of its block input, bytes of the projections that
  remat 'save_matmuls' keeps) under `tensor`-way TP.

  Counted per token and block: two RMSNorms (fp32 upcast + output), q/k/v and their fp32 RoPE copies,
  the attention output, o-projection, the SwiGLU gate/up/product and down projection; plus, when the attention
  `kernel` (attention.resolve on this platform) is 'xla', the L x L logits and fp32 probabilities of this token's
  row (the fused and blockwise kernels keep none).
  Head, MLP and vocabulary widths split over the tensor axis; the residual stream D does not.
  """
  b = np.dtype(cfg.dtype).itemsize
  d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  nh, kh, ft, nt = n * h / tensor, k * h / tensor, f / tensor, n / tensor
  saved = b * (2 * d + (nh + 2 * kh) + nh + d + 3 * ft + d) + 4 * (2 * d + (nh + kh))
  if kernel == "xla":
    saved += nt * length * (4 + b)
  named = b * (nh + 2 * kh + d)  # model.SAVED_MATMULS: q, k, v and o projection outputs.
  return int(saved), int(b * d), int(named)


def estimate(model_cfg: model_lib.ModelConfig, mesh_shape: dict, rules, batch_size: int, max_length: int,
             remat: str | None = None, param_dtype: str | None = None, dtype: str | None = None,
             grad_accum_steps: int = 1, branches: bool = False) -> dict:
  """Per-device bytes of one training step; `mesh_shape` maps data/fsdp/tensor to (resolved) sizes.

  `batch_size` counts pairs across all devices (each pair is two sequences of up to `max_length` tokens);
  with gradient accumulation one microbatch of batch_size / grad_accum_steps pairs is live at a time.
  `branches`: shared-prompt rows (data.group_by_prompt), for which `auto` may pick another kernel.
  """
  overrides = {k: v for k, v in (("remat", remat), ("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
  cfg = dataclasses.replace(model_cfg, **overrides)
  mesh_shape = {a: int(mesh_shape[a]) for a in ("data", "fsdp", "tensor")}
  rows = abstract_params(cfg)
  num_params = sum(math.prod(shape) for _, _, shape, _ in rows)
  param_bytes = sum(math.prod(shard_shape(shape, axes, mesh_shape, rules)) * dt.itemsize
                    for _, axes, shape, dt in rows)
  # optax.adamw keeps mu and nu in the parameters' dtype and shardings; gradients match the parameters too,
  # for the trained ones only (an untied model's LM head is not: optimizer.FROZEN).
  trained = [row for row in rows if optimizer.is_trained(tuple(row[0].split(".")))]
  trained_bytes = sum(math.prod(shard_shape(shape, axes, mesh_shape, rules)) * dt.itemsize
                      for _, axes, shape, dt in trained)
  adam_bytes = 2 * trained_bytes
  accumulator = trained_bytes if grad_accum_steps > 1 else 0

  batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
  local_sequences = 2 * -(-batch_size // (batch_ways * grad_accum_steps))
  tensor = mesh_shape["tensor"]
  kernel = attention.resolve(cfg.attention, cfg.dtype, branches=branches)
  block_saved, block_input, block_named = _activation_bytes_per_token(cfg, tensor, max_length, kernel)
  tokens = local_sequences * max_length
  if cfg.remat != "none":
    # Each block keeps its input (and with save_matmuls its named projections); the rest is recomputed one block
    # at a time in the backward pass, where that block's saved values and their gradients are live together.
    kept = block_input + (block_named if cfg.remat == "save_matmuls" else 0)
    activations = tokens * (cfg.num_layers * kept + 2 * block_saved)
  else:
    activations = tokens * (cfg.num_layers * block_saved + block_saved)
  # Embedding output and final norm: two more residual-stream copies, plus their fp32 gradient.
  activations += tokens * (2 * block_input + 4 * cfg.hidden_size)

  # FSDP all-gathers one block's weights (in compute dtype) right before use and XLA prefetches the next one.
  gathered = 0
  if mesh_shape["fsdp"] > 1:
    # All blocks' rows, unstacked (blocks.{i}.*) or stacked on the replicated layers axis (blocks.*), over depth.
    block_rows = [r for r in rows if r[0].startswith("backbone.blocks.")]
    block_params_per_device = sum(math.prod(shard_shape(shape, axes, {**mesh_shape, "fsdp": 1}, rules))
                                  for _, axes, shape, _ in block_rows) // cfg.num_layers
    gathered = 2 * block_params_per_device * np.dtype(cfg.dtype).itemsize

  result = {
      "parameters": param_bytes, "gradients": trained_bytes, "adam_state": adam_bytes,
      "grad_accumulator": accumulator, "activations": int(activations), "gathered_weights": int(gathered),
  }
  result["total"] = sum(result[k] for k in STATE_KEYS + TRANSIENT_KEYS)
  result["info"] = {
      "num_parameters": int(num_params), "trained_parameters": sum(math.prod(shape) for _, _, shape, _ in trained),
      "mesh": mesh_shape, "devices": math.prod(mesh_shape.values()),
      "batch_size": batch_size, "grad_accum_steps": grad_accum_steps, "local_sequences": local_sequences,
      "max_length": max_length, "remat": cfg.remat, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
      "attention": cfg.attention if cfg.attention == kernel else f"{cfg.attention} = {kernel}",  # auto's pick
  }
  return result


def from_config(config, model_cfg: model_lib.ModelConfig, mesh_shape: dict) -> dict:
  """`estimate` for a run config and its resolved mesh, e.g. `dict(mesh.shape)` in train.py.

  Packed batches are bounded by their largest row count, one row per sequence, each `pack_length` wide: the
  estimate takes that worst case (typical packed batches hold far fewer rows)."""
  d = config.data
  width = (d.pack_length or d.max_length) if d.packing else d.max_length
  return estimate(model_cfg, mesh_shape, sharding.rules(config.mesh), config.train.batch_size, width,
                  grad_accum_steps=int(config.train.get("grad_accum_steps", 1) or 1), branches=d.group_by_prompt)


def fits(est: dict) -> list[str]:
  """Accelerators whose per-chip memory holds the estimate with headroom for XLA."""
  return [name for name, capacity in ACCELERATORS if est["total"] <= USABLE * capacity]


def slice_names(devices: int) -> list[str]:
  """How a mesh of `devices` chips is ordered; TPU v4/v5p names count TensorCores (2 per chip, 4 chips minimum)."""
  names = [f"{devices} GPU(s)"]
  if devices >= 4:
    names += [f"v4-{2 * devices}", f"v5p-{2 * devices}"]
  if devices in (1, 4, 8) or (devices >= 16 and devices & (devices - 1) == 0):
    names += [f"v5litepod-{devices}", f"v6e-{devices}"]
  return names


def render(est: dict) -> str:
  info = est["info"]
  mesh = " x ".join(f"{k}={v}" for k, v in info["mesh"].items())
  gib = lambda x: f"{x / GiB:8.2f} GiB"
  lines = [
      f"memory per device: {info['num_parameters'] / 1e9:.2f}B parameters on mesh {mesh} ({info['devices']} "
      f"devices); {info['local_sequences']} sequences x {info['max_length']} tokens per device per "
      f"{'microbatch' if info['grad_accum_steps'] > 1 else 'step'}; compute {info['dtype']}, parameters "
      f"{info['param_dtype']}, remat {info['remat']}, attention {info['attention']}",
      f"  parameters        {gib(est['parameters'])}",
      f"  gradients         {gib(est['gradients'])}  ({info['trained_parameters'] / 1e9:.2f}B trained parameters)",
      f"  Adam state        {gib(est['adam_state'])}",
  ]
  if est["grad_accumulator"]:
    lines.append(f"  grad accumulator  {gib(est['grad_accumulator'])}")
  lines += [
      f"  activations       {gib(est['activations'])}  (estimate)",
      f"  gathered weights  {gib(est['gathered_weights'])}  (FSDP all-gather of ~2 blocks)",
      f"  total             {gib(est['total'])}",
  ]
  fitting = fits(est)
  lines.append(f"  fits (<= {USABLE:.0%} of per-chip memory): " + (", ".join(fitting) if fitting else "none listed; "
               "add devices (mesh.fsdp), remat, a smaller batch or train.grad_accum_steps"))
  lines.append(f"  this mesh is: {', '.join(slice_names(info['devices']))}")
  return "\n".join(lines)
