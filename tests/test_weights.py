"""weights.py: each host reads only its devices' slices (once each), stacked leaves, per-tensor gathered export
in bounded shards; two processes on localhost read half of every sharded tensor and load what one process does."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import ROOT, xla_flags  # pylint: disable=g-bad-import-order
from jaxreward import configuration, hf, model as model_lib, sharding, state, weights

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, tie_embeddings=True)
KILL_AFTER_S = 180


def _mesh(data, fsdp, tensor):
  mesh_cfg = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor,
                                        "rules": configuration.defaults().mesh.rules})
  return sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)


def _random_model(cfg=CFG, seed=0):
  with nnx.use_eager_sharding(False):
    model = model_lib.RewardModel(cfg, nnx.Rngs(seed))
  # Norm scales start at exactly 1: make them distinguishable.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      var.set_value(var.get_value() + jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
  return model


def _tensors(folder):
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(folder, name), "numpy") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _file_bytes(folder):
  return sum(v.nbytes for v in _tensors(folder).values())


def test_sharded_load_reads_each_slice_once_and_round_trips_through_shards(tmp_path):
  model = _random_model()
  single = hf.write_weights(model, str(tmp_path / "one"))
  assert single == ["model.safetensors"] and not (tmp_path / "one" / weights.INDEX).exists()
  many = hf.write_weights(model, str(tmp_path / "many"), max_shard_bytes=20_000)
  index = json.loads((tmp_path / "many" / weights.INDEX).read_text())
  assert len(many) > 2 and sorted(set(index["weight_map"].values())) == many
  assert all(os.path.getsize(tmp_path / "many" / f) < 20_000 + 16_384 for f in many)  # One tensor may overflow.
  one, several = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
  assert one.keys() == several.keys() and index["metadata"]["total_size"] == _file_bytes(tmp_path / "one")
  for name in one:
    np.testing.assert_array_equal(one[name], several[name])

  # data=2 x fsdp=2 x tensor=2: every slice is held by two devices (data) of this one host, so reading each once
  # reads exactly the file; reading per device would read it twice.
  mesh, rule_table = _mesh(2, 2, 2)
  _, target = state.params_target(CFG, mesh, rule_table)
  reader = weights.Reader(str(tmp_path / "many"))
  params = hf.load_params(str(tmp_path / "many"), target, reader)
  assert reader.bytes_read == _file_bytes(tmp_path / "many")
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(params):
    assert var.get_value().sharding == dict(nnx.to_flat_state(target))[path].get_value().sharding
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(want[path].get_value()), err_msg=str(path))


def test_stacked_leaf_reads_each_layers_slices_in_file_dtype(tmp_path):
  layers, d_out, d_in = 4, 6, 8
  rng = np.random.default_rng(0)
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (jax's own dependency; bfloat16 for numpy)
  tensors = {f"layers.{i}.w": rng.normal(size=(d_out, d_in)).astype(ml_dtypes.bfloat16) for i in range(layers)}
  tensors["other"] = rng.normal(size=(3,)).astype(np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  entry = [(f"layers.{i}.w", True) for i in range(layers)]
  want = np.stack([tensors[name].astype(np.float32).T for name, _ in entry])

  mesh, _ = _mesh(2, 2, 2)
  # Layers split over `data` too: a device's first index component picks which layers it reads.
  for spec in (PartitionSpec(None, "fsdp", "tensor"), PartitionSpec("data", "tensor", "fsdp")):
    target = jax.ShapeDtypeStruct(want.shape, np.float32, sharding=NamedSharding(mesh, spec))
    reader = weights.Reader(str(tmp_path))
    got = weights.load(reader, entry, target)
    assert got.sharding == target.sharding and got.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got), want)
    assert reader.bytes_read == layers * d_out * d_in * 2  # bf16 in the file, each element once.
    for i, (name, _) in enumerate(entry):
      np.testing.assert_array_equal(weights.gathered(got, i), want[i])

  # Written back per layer, as hf_tensors does for a stacked parameter.
  fetches = [(name, (d_out, d_in), np.float32, lambda i=i: weights.gathered(got, i).T) for i, (name, _) in
             enumerate(entry)]
  weights.write(fetches, str(tmp_path / "out"))
  again = _tensors(tmp_path / "out")
  for name, _ in entry:
    np.testing.assert_array_equal(again[name], tensors[name].astype(np.float32))

  bad = jax.ShapeDtypeStruct((layers, d_out, d_in), np.float32, sharding=target.sharding)
  with pytest.raises(configuration.ConfigError, match=r"layers.0.w has shape \[6, 8\]; the model expects \[8, 6\]"):
    weights.load(weights.Reader(str(tmp_path)), entry, bad)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_read_only_their_slices_and_export_gathered(tmp_path):
  model = _random_model()
  source = str(tmp_path / "source")
  hf.write_weights(model, source, max_shard_bytes=20_000)
  port = str(_free_port())
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR="",  # A cache hit on one host and a compile on another time out gloo.
             MODEL_CFG=json.dumps(dataclasses.asdict(CFG)))
  procs = [subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable,
                             str(ROOT / "tests" / "weights_worker.py"), source, str(tmp_path / "out"), str(i), port],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate()
    assert p.returncode == 0, f"worker exited {p.returncode} (-9/137: killed at {KILL_AFTER_S} s)\n{err[-3000:]}"
    results.append(json.loads(out.strip().splitlines()[-1]))

  assert [(r["process_index"], r["process_count"]) for r in results] == [(0, 2), (1, 2)]
  assert all(not r["mismatches"] for r in results), results
  # Every 2-D tensor has a model-width axis, sharded over fsdp = the two processes: each reads half of it. The
  # norm scales are replicated: each process reads them once although both its devices hold them.
  tensors = _tensors(source)
  matrices = sum(v.nbytes for v in tensors.values() if v.ndim == 2)
  vectors = sum(v.nbytes for v in tensors.values() if v.ndim == 1)
  assert matrices > 10 * vectors
  for r in results:
    assert r["bytes_read"] == matrices // 2 + vectors, (r, matrices, vectors)
    q_bytes = sum(v.nbytes for k, v in tensors.items() if k.endswith("q_proj.weight"))
    assert r["stacked_bytes_read"] == q_bytes // 2

  # Gathered per tensor and written by process 0: the same tensors, the same shards.
  out = _tensors(tmp_path / "out")
  assert out.keys() == tensors.keys()
  for name, value in tensors.items():
    np.testing.assert_array_equal(out[name], value, err_msg=name)
  assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(source))
