"""Mesh resolution, annotation checks, and sharded training equal to single-device training."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxreward import configuration, model as model_lib, pipeline, sharding, state, synthetic, tokenizer
from tests.conftest import load_config


def mesh_cfg(data, fsdp, tensor):
  base = load_config("tiny").mesh
  base.data, base.fsdp, base.tensor = data, fsdp, tensor
  return base


def test_mesh_shape_fills_minus_one():
  assert sharding.mesh_shape(mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(mesh_cfg(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(sharding.ConfigError, match="need 4 devices"):
    sharding.mesh_shape(mesh_cfg(2, 2, 1), 8)
  with pytest.raises(sharding.ConfigError, match="at most one -1"):
    sharding.mesh_shape(mesh_cfg(-1, -1, 1), 8)
  with pytest.raises(sharding.ConfigError, match="do not divide"):
    sharding.mesh_shape(mesh_cfg(-1, 3, 1), 8)


def test_unannotated_large_parameter_is_an_error():
  class Bad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(np.zeros((512, 512), np.float32))

  with pytest.raises(ValueError, match="no logical axis names"):
    sharding.check_annotated(nnx.state(Bad(), nnx.Param))


@functools.cache  # The single-device runs serve both the sharded and the packed-vs-bucketed comparisons.
def _run_steps(mesh_shape, packed, scan_layers, num_steps=5):
  """`num_steps` of tiny on a (data, fsdp, tensor) mesh: (losses, params, state). Called with positional
  arguments only, so that equal runs hit the cache."""
  mesh_config = mesh_cfg(*mesh_shape)
  config = load_config("tiny")
  config.model.scan_layers = scan_layers
  tok = tokenizer.train_bpe(tokenizer.texts_for_tokenizer(synthetic.generate(200, 0)), 300)
  enc = tokenizer.encode(synthetic.generate(200, 0), tok, 64, "keep_end")
  model_cfg = model_lib.ModelConfig.from_config(config.model, len(tok))
  mesh = sharding.make_mesh(mesh_config)
  rule_table = sharding.rules(mesh_config)
  config.train.center_rewards_coef = 0.0
  trainer = state.Trainer(model_cfg, config.train, mesh, rule_table, num_steps)
  plan = pipeline.TrainPlan(enc, 16, 4, seed=0)
  if packed:  # One packing group per batch shard; the packing itself differs with the mesh, the math must not.
    layout = pipeline.PackedLayout(64, mesh.shape["data"] * mesh.shape["fsdp"], 16, tok.pad_token_id)
    layout.fit_buckets([layout.rows_needed(enc, idx) for idx in plan.epoch(0)], 4)
  else:
    layout = pipeline.BucketedLayout([32, 64], tok.pad_token_id)
  it = iter(pipeline.train_dataset(plan, num_steps, layout, trainer.batch_sharding))
  losses = []
  for _ in range(num_steps):
    metrics = trainer.step(next(it))
    losses.append(float(metrics["loss"]) / float(metrics["count"]))
  return np.array(losses), jax.device_get(trainer.state["params"]), trainer.state


@pytest.mark.parametrize("packed,scan_layers", [(False, False), (True, False), (True, True)])
def test_sharded_training_equals_single_device(packed, scan_layers):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  single, params_1, _ = _run_steps((1, 1, 1), packed, scan_layers)
  sharded, params_8, state_8 = _run_steps((2, 2, 2), packed, scan_layers)
  np.testing.assert_allclose(sharded, single, atol=1e-4)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # The parameters really were split: the MLP kernel lives on the fsdp x tensor grid (every layer, when stacked).
  blocks = state_8["params"]["backbone"]["blocks"]
  gate = (blocks if scan_layers else blocks[0])["mlp"]["gate_DxF"][...]
  lead = (None,) if scan_layers else ()
  assert gate.sharding.spec == jax.sharding.PartitionSpec(*lead, "fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == gate.shape[:len(lead)] + (gate.shape[-2] // 2, gate.shape[-1] // 2)


def test_packed_training_equals_bucketed_training():
  """Same pairs per step, packed into rows or padded per sequence: the same losses and parameters."""
  bucketed, params_b, _ = _run_steps((1, 1, 1), False, False)
  packed, params_p, _ = _run_steps((1, 1, 1), True, False)
  np.testing.assert_allclose(packed, bucketed, atol=1e-5)
  for a, b in zip(jax.tree.leaves(params_b), jax.tree.leaves(params_p)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),  # A single-host slice: nothing to join.
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, "GKE TPU slice"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "GKE TPU slice"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
])
def test_detected_cluster_joins_only_multi_process_launches(monkeypatch, env, expected):
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding.detected_cluster() == expected


def test_initialize_with_nothing_to_join_is_one_config_error():
  config = load_config("tiny")
  config.distributed.initialize = "yes"  # No coordinator given and no cluster to detect it from.
  with pytest.raises(configuration.ConfigError, match="could not join the multi-host job"):
    sharding.initialize_processes(config.distributed)
