"""Each sharding preset compiles the train step of its real config (shrunk) on 8 fake CPU devices and puts
every parameter, and its Adam moments, where the preset says."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxreward import model as model_lib, optimizer, pipeline, presets, sharding, state
from tests.conftest import load_config

# Written out here rather than read from presets.py, so a wrong rules table there fails this test.
INTENDED = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "fsdp_tp": {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"},
}
CASES = [  # (config file, preset, axis sizes, mesh shape on 8 devices)
    ("medium", "dp", {}, (8, 1, 1)),
    ("medium", "fsdp", {}, (1, 8, 1)),
    ("large", "fsdp_tp", {"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ("large", "fsdp_tp", {"data": 1, "fsdp": -1, "tensor": 4}, (1, 2, 4)),
]


def shrunk(name):
  """The real config with small widths: dtype, remat, tying and the mesh rules stay as they are."""
  config = load_config(name)
  m = config.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 64, 2, 8, 4, 8, 128
  m.attention = "xla"  # cudnn (medium's GPU setting) has no CPU kernel.
  return config


def expected_spec(logical_axes, intended):
  return PartitionSpec(*(intended.get(a) for a in logical_axes))


def padded(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


def test_configs_use_their_presets():
  assert load_config("medium").mesh.rules == [tuple(r) for r in presets.PRESETS["fsdp"]["rules"]]
  large = load_config("large")
  assert large.mesh.rules == [tuple(r) for r in presets.PRESETS["fsdp_tp"]["rules"]]
  assert (large.mesh.data, large.mesh.fsdp, large.mesh.tensor) == (-1, 8, 4)


def test_bad_preset_arguments():
  config = load_config("tiny")
  with pytest.raises(ValueError, match="unknown sharding preset"):
    presets.apply(config, "zero3")
  with pytest.raises(ValueError, match="fsdp and tensor must stay 1"):
    presets.apply(config, "dp", tensor=2)


@pytest.mark.parametrize("config_name,preset,sizes,mesh_shape", CASES)
def test_preset_compiles_with_intended_shardings(config_name, preset, sizes, mesh_shape):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  config = presets.apply(shrunk(config_name), preset, **sizes)
  mesh = sharding.make_mesh(config.mesh)
  assert tuple(mesh.shape.values()) == mesh_shape
  rule_table = sharding.rules(config.mesh)
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab_size=256)
  trainer = state.Trainer(model_cfg, config.train, mesh, rule_table, 10)
  train_state = trainer.state

  # Abstract inputs only: this checks the step partitions and compiles under the preset, without running it.
  pairs, length, where = config.train.batch_size, 32, trainer.batch_sharding
  batch = pipeline.Batch(tokens_GxRxL=jax.ShapeDtypeStruct((pairs, 2, length), jnp.int32, sharding=where),
                         ends_GxBxP=jax.ShapeDtypeStruct((pairs, 1, 2), jnp.int32, sharding=where),
                         weight_GxB=jax.ShapeDtypeStruct((pairs, 1), jnp.float32, sharding=where),
                         margin_GxB=jax.ShapeDtypeStruct((pairs, 1), jnp.float32, sharding=where))
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), train_state)
  compiled = trainer.train_step.lower(abstract_state, batch).compile()
  out_params = nnx.to_flat_state(compiled.output_shardings[0]["params"])

  intended = INTENDED[preset]
  flat = nnx.to_flat_state(train_state["params"])
  assert len(flat) == len(out_params)
  assert sum(var[...].size for _, var in flat) == model_cfg.num_parameters()
  split_somewhere = False
  for (path, var), (_, out_sharding) in zip(flat, out_params):
    name = ".".join(map(str, path))
    array, axes = var[...], var.get_metadata()["out_sharding"]
    want = padded(expected_spec(axes, intended), array.ndim)
    assert padded(array.sharding.spec, array.ndim) == want, name
    # The compiled step hands the parameter back in the same layout, so no step reshards the state.
    out = out_sharding.get_value() if hasattr(out_sharding, "get_value") else out_sharding
    assert out.is_equivalent_to(array.sharding, array.ndim), name
    ways = [mesh.shape[a] if a else 1 for a in want]
    assert array.addressable_shards[0].data.shape == tuple(d // w for d, w in zip(array.shape, ways)), name
    split_somewhere |= any(w > 1 for w in ways)
  assert split_somewhere == (preset != "dp")

  # Adam's moments follow their parameters (ZeRO: optimizer state is split exactly like the weights).
  adam = train_state["opt_state"][1][0]
  for moments in (adam.mu, adam.nu):
    trained = [(path, var) for path, var in flat if optimizer.is_trained(path)]  # No moments for a frozen LM head.
    for (path, var), (moment_path, moment) in zip(trained, nnx.to_flat_state(moments), strict=True):
      assert moment_path == path and moment[...].sharding.is_equivalent_to(var[...].sharding, var[...].ndim), path
