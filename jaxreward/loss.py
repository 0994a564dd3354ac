"""Bradley-Terry preference loss and the per-batch statistics logged beside it.

Every batch carries `weight_B` (1 for a real pair, 0 for padding that fills the last evaluation batch),
so sums and counts are exact whatever the batch size; callers divide at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_losses(r_Bx2, margin_B, center_coef: float = 0.0):
  """-log σ(r_chosen − r_rejected − margin) per pair, plus the optional reward-centering term.

  `margin_B` is the dataset's optional preference margin (Llama-2 style; zeros when absent).
  `center_coef` adds coef·(r_chosen + r_rejected)² as in TRL's `center_rewards_coefficient`, which
  keeps rewards near zero for the RL stage without changing which response wins.
  """
  diff_B = r_Bx2[:, 0] - r_Bx2[:, 1]
  loss_B = -jax.nn.log_sigmoid(diff_B - margin_B)
  return loss_B + centering(r_Bx2, center_coef), diff_B


def centering(r_Bx2, center_coef: float):
  """coef·(r_chosen + r_rejected)² per pair (0 without a coefficient), added to either loss."""
  return center_coef * jnp.sum(r_Bx2, axis=1) ** 2 if center_coef else 0.0


def plackett_luce_losses(r_Bx2, winner_B):
  """Per pair, its share of the Plackett-Luce loss of its winner: -(r_w - logsumexp(r_w, r of every response w
  beats in the batch)) / (pairs w wins), so the pairs' sum is the sum over winners (`winner_B`: equal ids for
  the pairs of one winner response). On a full ranking (each response beats every lower one) that sum is the
  ranking's PL negative log-likelihood; a single pair per winner gives exactly the Bradley-Terry loss. Responses
  count as one only where the layout shares them (GraphLayout's prompt trees), so PL acts on whole groups there
  and is BT elsewhere. Margins do not enter."""
  same_BxB = winner_B[:, None] == winner_B[None, :]
  r_loser_BxB = jnp.where(same_BxB, r_Bx2[None, :, 1], -jnp.inf)
  lse_B = jnp.logaddexp(r_Bx2[:, 0], jax.nn.logsumexp(r_loser_BxB, axis=1))
  return -(r_Bx2[:, 0] - lse_B) / jnp.sum(same_BxB, axis=1)


def correct(diff_B, xp=jnp):
  """1 right, 0 wrong, 0.5 for a tie (an untrained model that scores everything equal sits at the 50% baseline).
  The one tie rule of training, analysis and scoring: `xp` is jax.numpy or numpy."""
  return xp.where(diff_B > 0, 1.0, xp.where(diff_B == 0, 0.5, 0.0))


def batch_sums(r_Bx2, weight_B, margin_B, center_coef: float = 0.0, winner_B=None) -> dict:
  """Weighted sums over the batch; `finalize` turns them into means. With `winner_B` the loss is Plackett-Luce's
  (plackett_luce_losses), the statistics stay pairwise."""
  loss_B, diff_B = pair_losses(r_Bx2, margin_B, center_coef)
  if winner_B is not None:
    # Filler pairs (weight 0) must not join a real winner's set.
    winner_B = jnp.where(weight_B > 0, winner_B, -1 - jnp.arange(winner_B.shape[0]))
    loss_B = plackett_luce_losses(r_Bx2, winner_B) + centering(r_Bx2, center_coef)
  w_B = weight_B.astype(jnp.float32)
  correct_B = correct(diff_B)
  return {
      "count": jnp.sum(w_B),
      "loss": jnp.sum(w_B * loss_B),
      "accuracy": jnp.sum(w_B * correct_B),
      "margin": jnp.sum(w_B * diff_B),
      "reward_chosen": jnp.sum(w_B * r_Bx2[:, 0]),
      "reward_rejected": jnp.sum(w_B * r_Bx2[:, 1]),
      "reward": jnp.sum(w_B * jnp.sum(r_Bx2, axis=1)) / 2,
      "reward_sq": jnp.sum(w_B * jnp.sum(r_Bx2 ** 2, axis=1)) / 2,
  }


def finalize(sums: dict) -> dict:
  """Means (and the reward std) from accumulated `batch_sums`; works on numpy or jax scalars."""
  n = max(float(sums["count"]), 1.0)
  out = {k: float(sums[k]) / n for k in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected",
                                         "reward")}
  var = float(sums["reward_sq"]) / n - out["reward"] ** 2
  out["reward_std"] = max(var, 0.0) ** 0.5
  out["count"] = int(round(float(sums["count"])))
  return out
