"""One process of tests/test_weights.py's two-host load (2 processes x 2 CPU devices, gloo, on localhost).

  python tests/weights_worker.py FOLDER OUT PROCESS_ID PORT

The model's dimensions come as JSON in $MODEL_CFG. Loads FOLDER's weights into a data=1 x fsdp=2 x tensor=2
mesh whose fsdp axis spans the processes (process p holds fsdp half p, both tensor halves on its two devices),
plus a hand-built stacked leaf (every layer's q_proj under one leading layers axis); checks every local shard
against the file; re-exports the weights to OUT (gathered one tensor at a time, process 0 writes). Prints one
JSON line: bytes read for the model and for the stacked leaf, shards that differ from the file.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

MAX_SHARD_BYTES = 20_000


def main(folder, out, process_id, port):
  # Set before any device is touched; the only collectives here are blocking gathers.
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec
  from safetensors import safe_open
  from jaxreward import configuration, hf, model as model_lib, sharding, state, weights

  cfg = model_lib.ModelConfig(**json.loads(os.environ["MODEL_CFG"]))
  mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2,
                                        "rules": configuration.defaults().mesh.rules})
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 2, 2), sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  _, target = state.params_target(cfg, mesh, sharding.rules(mesh_cfg))

  reader = weights.Reader(folder)
  params = hf.load_params(folder, target, reader)
  full = {}
  for path in sorted(set(reader.where.values())):
    with safe_open(path, "numpy") as f:
      full.update({name: f.get_tensor(name) for name in f.keys()})
  mismatches = []
  for path, var in nnx.to_flat_state(params):
    name, transpose = hf.name_map(cfg)[path]
    want = full[name].T if transpose else full[name]
    for shard in var.get_value().addressable_shards:
      if not np.array_equal(np.asarray(shard.data), want[shard.index]):
        mismatches.append(f"{'.'.join(map(str, path))} {shard.index}")

  # A stacked leaf: what a scanned model's name_map gives (one (name, transpose) per layer).
  entry = [(f"model.layers.{i}.self_attn.q_proj.weight", True) for i in range(cfg.num_layers)]
  stacked_target = jax.ShapeDtypeStruct((cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim), np.float32,
                                        sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor")))
  stacked_reader = weights.Reader(folder)
  stacked = weights.load(stacked_reader, entry, stacked_target)
  want = np.stack([full[name].T for name, _ in entry])
  for shard in stacked.addressable_shards:
    if not np.array_equal(np.asarray(shard.data), want[shard.index]):
      mismatches.append(f"stacked {shard.index}")
  for i, (name, _) in enumerate(entry):
    if not np.array_equal(weights.gathered(stacked, i).T, full[name]):
      mismatches.append(f"stacked gather {i}")

  weights.write(hf.hf_tensors(params, cfg), out, MAX_SHARD_BYTES, metadata={"format": "pt"})
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "bytes_read": reader.bytes_read, "stacked_bytes_read": stacked_reader.bytes_read,
                    "mismatches": mismatches}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
