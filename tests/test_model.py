"""Model: parameter count, logical annotations, and where the reward is read."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreward import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, qkv_bias=True, tie_embeddings=False)


def build(cfg=CFG):
  with nnx.use_eager_sharding(False):
    return model_lib.RewardModel(cfg, nnx.Rngs(0))


def test_parameter_count_matches_formula():
  model = build()
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_parameters()


def test_every_parameter_has_logical_axes():
  model = build()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_reward_ignores_tokens_after_length():
  model = build()
  tokens = np.random.default_rng(0).integers(2, 97, size=(2, 12)).astype(np.int32)
  lengths = jnp.array([7, 12])
  r = model(jnp.asarray(tokens), lengths)
  tokens[0, 7:] = 0  # Padding after the scored token must not matter (causal attention).
  r_padded = model(jnp.asarray(tokens), lengths)
  np.testing.assert_allclose(r, r_padded, atol=1e-6)
  # ...and the same sequence in a wider batch scores the same.
  wide = np.concatenate([tokens, np.zeros((2, 20), np.int32)], axis=1)
  np.testing.assert_allclose(model(jnp.asarray(wide), lengths), r, atol=1e-5)


def test_reward_depends_on_the_last_real_token():
  model = build()
  tokens = jnp.arange(10, dtype=jnp.int32)[None].repeat(2, 0)
  r = model(tokens, jnp.array([5, 6]))
  assert abs(float(r[0] - r[1])) > 1e-6


def test_pairs_fold_into_the_batch():
  model = build()
  tokens_BxPxL = jnp.asarray(np.random.default_rng(1).integers(2, 97, size=(3, 2, 9)), jnp.int32)
  lengths_BxP = jnp.array([[9, 4], [5, 6], [1, 9]])
  # One pair per group, one sequence per row: side p's EOS is at p·L + length - 1 of its group's rows.
  r_Bx2 = model.score(tokens_BxPxL, (jnp.arange(2) * 9 + lengths_BxP - 1)[:, None, :])[:, 0, :]
  for b in range(3):
    for p in range(2):
      single = model(tokens_BxPxL[b, p][None], lengths_BxP[b, p][None])
      np.testing.assert_allclose(r_Bx2[b, p], single[0], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  cfg32 = CFG
  cfg16 = model_lib.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  m32, m16 = build(cfg32), build(cfg16)
  tokens = jnp.asarray(np.random.default_rng(2).integers(2, 97, size=(4, 16)), jnp.int32)
  lengths = jnp.array([16, 10, 5, 1])
  np.testing.assert_allclose(m16(tokens, lengths), m32(tokens, lengths), atol=5e-2)
