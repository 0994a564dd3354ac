"""Model: parameter count, logical annotations, and where the reward is read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreward import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, qkv_bias=True, tie_embeddings=False)


def build(cfg=CFG):
  with nnx.use_eager_sharding(False):
    return model_lib.RewardModel(cfg, nnx.Rngs(0))


# Jitted as training and scoring run it: eagerly, each of the model's ops compiled on its own, which cost more
# than these tests' few whole programs.
@nnx.jit
def rewards(model, tokens_BxL, lengths_B):
  return model(tokens_BxL, lengths_B)


@nnx.jit
def score(model, tokens_GxRxL, ends_GxBxP):
  return model.score(tokens_GxRxL, ends_GxBxP)


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
  r = rewards(model, jnp.asarray(tokens), lengths)
  tokens[0, 7:] = 0  # Padding after the scored token must not matter (causal attention).
  r_padded = rewards(model, jnp.asarray(tokens), lengths)
  np.testing.assert_allclose(r, r_padded, atol=1e-6)
  # ...and the same sequence in a wider batch scores the same.
  wide = np.concatenate([tokens, np.zeros((2, 20), np.int32)], axis=1)
  np.testing.assert_allclose(rewards(model, jnp.asarray(wide), lengths), r, atol=1e-5)


def test_reward_depends_on_the_last_real_token():
  model = build()
  tokens = jnp.arange(10, dtype=jnp.int32)[None].repeat(2, 0)
  r = rewards(model, tokens, jnp.array([5, 6]))
  assert abs(float(r[0] - r[1])) > 1e-6


def test_pairs_fold_into_the_batch():
  model = build()
  tokens_BxPxL = jnp.asarray(np.random.default_rng(1).integers(2, 97, size=(3, 2, 9)), jnp.int32)
  lengths_BxP = jnp.array([[9, 4], [5, 6], [1, 9]])
  # One pair per group, one sequence per row: side p's EOS is at p·L + length - 1 of its group's rows.
  r_Bx2 = score(model, tokens_BxPxL, (jnp.arange(2) * 9 + lengths_BxP - 1)[:, None, :])[:, 0, :]
  for b in range(3):
    for p in range(2):
      single = rewards(model, tokens_BxPxL[b, p][None], lengths_BxP[b, p][None])
      np.testing.assert_allclose(r_Bx2[b, p], single[0], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  cfg32 = CFG
  cfg16 = model_lib.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  m32, m16 = build(cfg32), build(cfg16)
  tokens = jnp.asarray(np.random.default_rng(2).integers(2, 97, size=(4, 16)), jnp.int32)
  lengths = jnp.array([16, 10, 5, 1])
  np.testing.assert_allclose(rewards(m16, tokens, lengths), rewards(m32, tokens, lengths), atol=5e-2)


def stacked_copy(model, cfg):
  """A scan_layers model holding `model`'s weights: its blocks' parameters stacked on a leading axis."""
  scanned = build(cfg)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  stacked = []
  for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if path[:2] == ("backbone", "blocks"):
      layers = [flat[path[:2] + (i,) + path[2:]].get_value() for i in range(cfg.num_layers)]
      stacked.append((path, var.replace(jnp.stack(layers))))
    else:
      stacked.append((path, var.replace(flat[path].get_value())))
  nnx.update(scanned, nnx.from_flat_state(stacked))
  return scanned


def loss_and_grads(model):
  """A scalar of every packed-row reward (two segments per row, padding) and its gradients."""
  rng = np.random.default_rng(3)
  tokens_GxRxL = jnp.asarray(rng.integers(2, 97, size=(2, 2, 12)), jnp.int32)
  positions = jnp.asarray(np.tile(np.r_[np.arange(5), np.arange(5), 0, 0], (2, 2, 1)), jnp.int32)
  segments = jnp.asarray(np.tile(np.r_[[1] * 5, [2] * 5, 0, 0], (2, 2, 1)), jnp.int32)
  ends_GxBxP = jnp.asarray([[[4, 9], [16, 21]]] * 2, jnp.int32)

  def f(m):
    r = m.score(tokens_GxRxL, ends_GxBxP, positions, segments)
    return jnp.sum(r * jnp.arange(1.0, 1.0 + r.size).reshape(r.shape))

  value, grads = nnx.jit(nnx.value_and_grad(f))(model)
  return value, {p: v.get_value() for p, v in nnx.to_flat_state(grads)}


def test_scanned_layers_equal_unrolled_layers_and_their_gradients():
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "num_layers": 3})
  unrolled = build(cfg)
  scanned = stacked_copy(unrolled, model_lib.ModelConfig(**{**cfg.__dict__, "scan_layers": True}))
  value_u, grads_u = loss_and_grads(unrolled)
  value_s, grads_s = loss_and_grads(scanned)
  np.testing.assert_allclose(value_s, value_u, rtol=1e-5)
  for path, g in grads_s.items():
    if path[:2] == ("backbone", "blocks"):
      want = jnp.stack([grads_u[path[:2] + (i,) + path[2:]] for i in range(cfg.num_layers)])
    else:
      want = grads_u[path]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("remat,scan_layers", [("save_matmuls", True), ("full", False)])
def test_remat_policies_equal_no_remat(remat, scan_layers):
  base = model_lib.ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers})
  model = build(base)
  value, grads = loss_and_grads(model)
  rematted = build(model_lib.ModelConfig(**{**base.__dict__, "remat": remat}))
  nnx.update(rematted, nnx.state(model, nnx.Param))
  value_r, grads_r = loss_and_grads(rematted)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for path, g in grads.items():
    np.testing.assert_allclose(grads_r[path], g, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_remat_policy_names_saved_values():
  """What a rematted block keeps for its backward pass (the residuals of its VJP): the input alone with full, plus
  the named attention projections with save_matmuls."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "num_layers": 1})
  block = build(cfg).backbone.blocks[0]
  h = jnp.ones((1, 6, cfg.hidden_size))
  inv_freq = model_lib.rope_frequencies(cfg)
  graphdef, params = nnx.split(block)

  def f(h):
    return nnx.merge(graphdef, params)(h, jnp.arange(6)[None], inv_freq)

  saved = {}
  for name in ("save_matmuls", "full"):
    policy = model_lib.remat_policy(name)
    _, vjp = jax.vjp(jax.checkpoint(f, policy=policy), h)
    saved[name] = sum(x.size for x in jax.tree.leaves(vjp))
  # q, k, v: B·L·(N+2K)·H; o: B·L·D.
  extra = 6 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 6 * cfg.hidden_size
  assert saved["save_matmuls"] - saved["full"] == extra


@pytest.mark.parametrize("num_layers,scan_layers,remat", [(3, False, "none"), (3, True, "none"), (1, True, "none"),
                                                          (2, True, "save_matmuls"), (1, False, "full")])
def test_last_block_at_read_positions_equals_the_whole_last_block(num_layers, scan_layers, remat):
  """`score` runs the last block's output projection, MLP and final norm only at the read positions; the
  rewards and every gradient equal running them over all positions and reading afterwards."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "num_layers": num_layers, "scan_layers": scan_layers,
                                 "remat": remat})
  model = build(cfg)

  class Everywhere(nnx.Module):
    """`score` as it was: the whole backbone on every position, then the reads."""

    def __init__(self, model):
      self.model = model

    def score(self, tokens_GxRxL, ends_GxBxP, positions, segments):
      g, r, l = tokens_GxRxL.shape
      h = self.model.backbone(tokens_GxRxL.reshape(g * r, l), positions.reshape(g * r, l),
                              segments.reshape(g * r, l)).reshape(g, r * l, -1)
      h_GxBPxD = jnp.take_along_axis(h, ends_GxBxP.reshape(g, -1)[:, :, None], axis=1)
      return self.model.head(h_GxBPxD.reshape(-1, h.shape[-1])).reshape(ends_GxBxP.shape)

  value, grads = loss_and_grads(model)
  value_all, grads_all = loss_and_grads(Everywhere(model))
  np.testing.assert_allclose(value, value_all, rtol=1e-6)
  for path, g in grads.items():
    np.testing.assert_allclose(g, grads_all[("model",) + path], rtol=1e-5, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 8e-3)])
def test_swiglu_gradient_equals_autodiff(dtype, tol):
  """The hand-written backward pass of silu(gate) · up equals JAX's differentiation of the plain expression in
  float32, on values wide enough to reach the sigmoid's tails; bf16 inputs and gradients within one bf16
  rounding of it (it computes in float32 and rounds once)."""
  rng = np.random.default_rng(3)
  gate, up, w = (jnp.asarray(rng.normal(size=(2, 5, 7)) * 4, dtype) for _ in range(3))
  f32 = lambda x: x.astype(jnp.float32)
  plain = lambda g, u: jnp.sum(jax.nn.silu(f32(g)) * f32(u) * f32(w))
  fused = lambda g, u: jnp.sum(f32(model_lib.swiglu(g, u)) * f32(w))
  np.testing.assert_allclose(f32(model_lib.swiglu(gate, up)), jax.nn.silu(f32(gate)) * f32(up), rtol=tol, atol=tol)
  for got, want in zip(jax.grad(fused, argnums=(0, 1))(gate, up), jax.grad(plain, argnums=(0, 1))(gate, up)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
