"""Bradley-Terry loss and batch statistics on hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np

from jaxreward import loss


def test_known_values():
  r = jnp.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
  sums = loss.batch_sums(r, jnp.ones(3), jnp.zeros(3))
  out = loss.finalize(sums)
  expected = np.mean([math.log1p(math.exp(-2.0)), math.log(2.0), math.log1p(math.exp(2.0))])
  assert abs(out["loss"] - expected) < 1e-6
  assert abs(out["accuracy"] - (1 + 0.5 + 0) / 3) < 1e-6  # A tie is half right.
  assert abs(out["margin"] - 0.0) < 1e-6
  assert abs(out["reward_chosen"] - 1 / 3) < 1e-6
  assert out["count"] == 3


def test_zero_weight_pairs_do_not_count():
  r = jnp.array([[1.0, 0.0], [-50.0, 50.0]])
  out = loss.finalize(loss.batch_sums(r, jnp.array([1.0, 0.0]), jnp.zeros(2)))
  assert out["count"] == 1 and out["accuracy"] == 1.0
  assert abs(out["loss"] - math.log1p(math.exp(-1.0))) < 1e-6


def test_margin_raises_the_bar():
  r = jnp.array([[1.0, 0.0]])
  plain = loss.finalize(loss.batch_sums(r, jnp.ones(1), jnp.zeros(1)))["loss"]
  with_margin = loss.finalize(loss.batch_sums(r, jnp.ones(1), jnp.array([2.0])))["loss"]
  assert abs(with_margin - math.log1p(math.exp(1.0))) < 1e-6 and with_margin > plain


def test_centering_penalises_offset_rewards():
  r = jnp.array([[11.0, 10.0]])
  l0, _ = loss.pair_losses(r, jnp.zeros(1), 0.0)
  l1, _ = loss.pair_losses(r, jnp.zeros(1), 0.01)
  assert abs(float(l1[0] - l0[0]) - 0.01 * 21.0 ** 2) < 1e-4


def test_reward_std():
  r = jnp.array([[1.0, -1.0], [3.0, -3.0]])
  out = loss.finalize(loss.batch_sums(r, jnp.ones(2), jnp.zeros(2)))
  assert abs(out["reward"]) < 1e-6 and abs(out["reward_std"] - math.sqrt(5.0)) < 1e-5


def test_plackett_luce_of_two_is_bradley_terry():
  r = jnp.array(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
  bt = loss.batch_sums(r, jnp.ones(5), jnp.zeros(5))
  pl = loss.batch_sums(r, jnp.ones(5), jnp.zeros(5), winner_B=jnp.arange(5))
  np.testing.assert_allclose(pl["loss"], bt["loss"], rtol=1e-6)


def test_plackett_luce_of_a_ranking_is_its_likelihood():
  """Four responses ranked 0 > 1 > 2 > 3 as their six pairs: the sum is the ranking's PL negative log-likelihood."""
  r_K = np.array([0.3, 1.2, -0.4, 0.1], np.float32)
  pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
  r = jnp.array([[r_K[i], r_K[j]] for i, j in pairs])
  winner = jnp.array([i for i, _ in pairs])
  expected = -sum(r_K[k] - np.log(np.exp(r_K[k:]).sum()) for k in range(3))
  weight = jnp.ones(len(pairs))
  np.testing.assert_allclose(loss.batch_sums(r, weight, jnp.zeros(6), winner_B=winner)["loss"], expected, rtol=1e-5)
  # A filler pair (weight 0) sharing a winner's id changes nothing.
  r5, w5 = jnp.concatenate([r, jnp.array([[0.0, 5.0]])]), jnp.concatenate([weight, jnp.zeros(1)])
  out = loss.batch_sums(r5, w5, jnp.zeros(7), winner_B=jnp.concatenate([winner, jnp.zeros(1, int)]))
  np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
