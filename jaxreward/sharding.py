"""The device mesh and the mapping from logical axis names to it.

Sharding is declared, not coded: parameters name their logical axes in `model.py`, the config holds one
rules table, and this module turns both into `NamedSharding`s. Nothing else in the project places data.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreward.configuration import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Parameters with at least this many elements must be sharded by some rule (or explicitly replicated by
# naming only axes that map to None); anything smaller may stay unannotated.
LARGE_PARAMETER = 1 << 16


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured axis sizes, one of which may be -1 ("the rest")."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} must be positive with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices do not divide by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                     f"but {num_devices} are present")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh. With no -1 axis and a single process, the first N devices are used."""
  devices = jax.devices() if devices is None else devices
  fixed = [int(mesh_cfg[a]) for a in MESH_AXES]
  if -1 not in fixed and jax.process_count() == 1 and 0 < math.prod(fixed) < len(devices):
    devices = devices[:math.prod(fixed)]
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the embedding gather does not type-check under jax 0.10's default Explicit axes.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def host_mesh_config(rule_list, data: int = -1) -> ml_collections.ConfigDict:
  """A mesh of this host's devices on the data axis only (-1: all of them), for scoring a saved model."""
  return ml_collections.ConfigDict({"data": data, "fsdp": 1, "tensor": 1, "rules": list(rule_list)})


def rules(mesh_cfg) -> tuple:
  """The config's rules table as the tuple of pairs that flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_cfg.rules)


def logical_to_mesh(logical_axes, rule_table) -> PartitionSpec:
  table = dict(rule_table)
  return PartitionSpec(*(table.get(name) if name is not None else None for name in logical_axes))


def batch_sharding(mesh, rule_table) -> NamedSharding:
  """Batches are sharded on their leading axis by the 'batch' rule and replicated elsewhere; a spec of one
  axis fits arrays of any rank, so this one sharding serves every field of a batch."""
  return NamedSharding(mesh, logical_to_mesh(("batch",), rule_table))


def state_shardings(abstract_state, mesh, rule_table):
  """NamedShardings for a tree of (abstract) nnx variables, checking every large one is annotated."""
  check_annotated(abstract_state)
  with nnx.logical_axis_rules(rule_table):
    return nnx.get_named_sharding(abstract_state, mesh)


def check_annotated(abstract_state) -> None:
  for path, var in nnx.to_flat_state(abstract_state):
    shape = getattr(var, "shape", None) or np.shape(var.get_value())
    axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if axes is None and math.prod(shape) >= LARGE_PARAMETER:
      name = ".".join(str(p) for p in path)
      raise ValueError(f"parameter {name} {tuple(shape)} has no logical axis names; annotate it in model.py")


def detected_cluster() -> str | None:
  """The multi-host launcher this process was started by, if its environment says so; else None.

  Cloud TPU VMs set no variable for it (JAX reads the VM's metadata): launch/tpu_vm.sh passes
  distributed.initialize=yes instead.
  """
  env = os.environ

  def count(name):
    value = env.get(name, "")
    return int(value) if value.isdigit() else 1

  if "," in env.get("TPU_PROCESS_ADDRESSES", "") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "GKE TPU slice"
  if count("SLURM_NTASKS") > 1:
    return "SLURM"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


def initialize_processes(dist_cfg) -> None:
  """Joins a multi-host job before any device is touched; a no-op for single-process runs.

  The coordination service that this starts is what keeps a pod from hanging: a process that dies (kill -9, a
  crashed host) stops sending heartbeats, and after `heartbeat_timeout_s` every other process is stopped with
  an error instead of waiting in a collective forever. It also runs JAX's preemption service (preemption.py).
  """
  wanted = dist_cfg.initialize == "yes" or (
      dist_cfg.initialize == "auto" and bool(dist_cfg.coordinator_address or detected_cluster()))
  if not wanted or jax.distributed.is_initialized():
    return
  kwargs = {"initialization_timeout": int(dist_cfg.initialization_timeout_s),
            "heartbeat_timeout_seconds": int(dist_cfg.heartbeat_timeout_s)}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes:
    kwargs["num_processes"] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = dist_cfg.process_id
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # No coordinator found or reached in time, or nothing to detect.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"distributed: could not join the multi-host job ({first}); check distributed.* "
                      f"(coordinator {dist_cfg.coordinator_address or 'detected'}, "
                      f"initialization_timeout_s={dist_cfg.initialization_timeout_s})") from e


def describe(mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" on {mesh.devices.size} " + \
         f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)"


def per_device_bytes(tree) -> int:
  """Bytes that the arrays of `tree` occupy on the first local device."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards"))
