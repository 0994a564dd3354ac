"""Error analysis of a reward model on preference pairs: numpy and scipy on (pairs, rewards, lengths).

Did the model learn preference or length? `analyze` puts the model's pairwise accuracy (with a 95% Wilson
interval) beside the baselines a reward model must beat on the *same* pairs — random, "longer response
wins", "shorter wins" — and measures length bias directly: accuracy when the chosen response is the
shorter one vs the longer one, and the correlation of the reward margin with the length difference.
It also reports calibration of σ(margin) (ECE + reliability plot), accuracy per category field and the
most confident mistakes. report.py renders the result as text (summary.txt) and markdown (model cards).

Conventions: `r_Nx2[:, 0]` is the chosen response's reward, `r_Nx2[:, 1]` the rejected one's; margin =
chosen − rejected. A tie (margin 0, or equal lengths for a length heuristic) counts as half right, so a
constant scorer sits exactly at 50%.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from jaxreward import loss, storage

Z95 = 1.959963984540054  # Two-sided 95% normal quantile.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
NUM_CALIBRATION_BINS = 10
NUM_HISTOGRAM_BINS = 20
MAX_CATEGORIES = 100  # A field with more distinct values is an id, not a category.
MIN_CATEGORY_SHOWN = 5  # Categories with fewer pairs are left out of the readable summaries (kept in JSON).


# ---------------------------------------------------------------------------------------------------------------
# Elementary metrics
# ---------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion; sane at 0 and n, unlike the normal approximation.

  Written out because ties count half, so `successes` may be fractional, which scipy.stats.binomtest refuses;
  on whole numbers it equals binomtest(...).proportion_ci(method="wilson") (tests/test_analysis.py).
  """
  if n <= 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
  return max(0.0, center - half), min(1.0, center + half)


def correct_N(diff_N: np.ndarray) -> np.ndarray:
  return loss.correct(diff_N, np)


def accuracy(diff_N: np.ndarray) -> dict:
  n = int(diff_N.size)
  wins = float(correct_N(diff_N).sum())
  lo, hi = wilson_interval(wins, n)
  return {"value": wins / n if n else float("nan"), "correct": wins, "n": n, "ci95": [lo, hi]}


def bt_loss(margin_N: np.ndarray, target_margin_N: np.ndarray | None = None) -> float:
  """Mean −log σ(margin − dataset margin), computed stably as softplus(−x) in float64 (loss.py's is float32)."""
  x = margin_N - (0.0 if target_margin_N is None else target_margin_N)
  return float(np.mean(np.logaddexp(0.0, -x))) if x.size else float("nan")


def moments(x: np.ndarray) -> dict:
  return {"mean": float(np.mean(x)), "std": float(np.std(x))} if x.size else {"mean": None, "std": None}


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  """None when either side is constant: the correlation is undefined, not zero."""
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  import scipy.stats  # pylint: disable=g-import-not-at-top  (seconds to import; only the post-run report needs it)
  return float(scipy.stats.pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  import scipy.stats  # pylint: disable=g-import-not-at-top
  return float(scipy.stats.spearmanr(x, y).statistic)


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # Exact at ±large without overflow warnings.


def calibration(diff_N: np.ndarray, num_bins: int = NUM_CALIBRATION_BINS) -> dict:
  """Expected calibration error of the model's pairwise preference probability σ(margin).

  Every pair is a prediction "the side the model prefers wins" made with confidence max(σ(m), 1 − σ(m))
  ∈ [0.5, 1]; it is right when that side is the chosen one (a tie: confidence 0.5, half right). Bins are
  equal-width over [0.5, 1]. ECE = Σ_bins (n_b / N)·|accuracy_b − confidence_b|. A model whose σ(margin)
  is the true preference probability has ECE → 0 as N grows.
  """
  p_N = sigmoid(diff_N.astype(np.float64))
  conf_N = np.maximum(p_N, 1.0 - p_N)
  right_N = correct_N(diff_N)
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  index_N = np.clip(np.searchsorted(edges, conf_N, side="right") - 1, 0, num_bins - 1)
  bins, ece = [], 0.0
  for b in range(num_bins):
    mask = index_N == b
    n = int(mask.sum())
    row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "confidence": None, "accuracy": None}
    if n:
      row["confidence"], row["accuracy"] = float(conf_N[mask].mean()), float(right_N[mask].mean())
      ece += n / diff_N.size * abs(row["accuracy"] - row["confidence"])
    bins.append(row)
  return {"ece": float(ece) if diff_N.size else None, "bins": bins,
          "mean_confidence": float(conf_N.mean()) if diff_N.size else None}


def plot_reliability(cal: dict, path: str, title: str = "") -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting is optional for the numbers)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  rows = [b for b in cal["bins"] if b["n"]]
  width = cal["bins"][0]["hi"] - cal["bins"][0]["lo"]
  ax.plot([0.5, 1.0], [0.5, 1.0], ":", color="grey", label="perfect calibration")
  ax.bar([b["lo"] for b in rows], [b["accuracy"] for b in rows], width=width * 0.9, align="edge", alpha=0.7,
         label="accuracy in bin")
  ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o-", color="C3",
          label="(mean confidence, accuracy)")
  ece = cal["ece"]
  ax.set(ylabel="accuracy", ylim=(0.0, 1.02), title=(title + "\n" if title else "") +
         (f"ECE {ece:.4f}" if ece is not None else "no pairs"))
  ax.legend(loc="upper left", fontsize=8)
  ax.grid(alpha=0.3)
  ax_n.bar([b["lo"] for b in cal["bins"]], [b["n"] for b in cal["bins"]], width=width * 0.9, align="edge")
  ax_n.set(xlabel="confidence max(σ(margin), 1 − σ(margin))", ylabel="pairs", xlim=(0.5, 1.0))
  fig.tight_layout()
  png = io.BytesIO()  # Written through storage: the path may be remote.
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  storage.write_atomically(path, png.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Texts and lengths
# ---------------------------------------------------------------------------------------------------------------


def as_text(value) -> str:
  """A prompt or response as plain text: conversations become 'role: content' lines."""
  if isinstance(value, str):
    return value
  return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)


def char_lengths_Nx2(pairs) -> np.ndarray:
  """Characters of the response contents only (roles and templates are the same on both sides)."""

  def chars(response):
    return len(response) if isinstance(response, str) else sum(len(m.get("content", "")) for m in response)

  return np.array([[chars(p.chosen), chars(p.rejected)] for p in pairs], np.int64).reshape(-1, 2)


def shorten(text: str, limit: int, keep: str = "start") -> str:
  text = " ".join(text.split())  # One line for reading: newlines and runs of spaces become one space.
  if len(text) <= limit:
    return text
  return text[:limit] + " …" if keep == "start" else "… " + text[-limit:]


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def category_fields(pairs) -> list[str]:
  """Fields of `Pair.extra` that look like categories: scalar values, 2..MAX_CATEGORIES distinct ones."""
  fields = sorted({k for p in pairs for k in p.extra})
  out = []
  for field in fields:
    values = [p.extra.get(field) for p in pairs]
    if not all(v is None or isinstance(v, (str, int, bool)) for v in values):
      continue
    distinct = {str(v) for v in values}
    if 2 <= len(distinct) <= MAX_CATEGORIES and (len(distinct) < len(pairs) or field == "category"):
      out.append(field)
  return out


def by_category(pairs, diff_N, long_diff_N, field: str) -> dict:
  """Per value of `field`: pairs, model accuracy (+ Wilson interval) and the 'longer wins' baseline there."""
  keys = np.array([str(p.extra.get(field)) for p in pairs], dtype=object)
  out = {}
  for value in sorted(set(keys), key=lambda v: (-int((keys == v).sum()), v)):
    mask = keys == value
    acc = accuracy(diff_N[mask])
    out[value] = {"n": acc["n"], "accuracy": acc["value"], "ci95": acc["ci95"],
                  "longer_wins": float(correct_N(long_diff_N[mask]).mean())}
  return out


def length_bias(diff_N: np.ndarray, len_diff_N: np.ndarray) -> dict:
  """Accuracy split by whether the chosen response is longer, and margin-vs-length-difference correlation.

  A model that rewards length is right when the chosen is longer and wrong when it is shorter, so the two
  accuracies drift apart; a length-neutral model scores about the same on both.
  """
  out = {}
  for name, mask in (("chosen_longer", len_diff_N > 0), ("chosen_shorter", len_diff_N < 0),
                     ("equal_length", len_diff_N == 0)):
    acc = accuracy(diff_N[mask])
    out[name] = {"n": acc["n"], "accuracy": acc["value"] if acc["n"] else None, "ci95": acc["ci95"]}
  longer, shorter = out["chosen_longer"]["accuracy"], out["chosen_shorter"]["accuracy"]
  out["accuracy_gap"] = longer - shorter if longer is not None and shorter is not None else None
  # How often the model prefers the longer of two unequal responses, whoever was chosen: 0.5 is neutral.
  unequal = len_diff_N != 0
  prefers = correct_N(np.sign(diff_N[unequal]) * np.sign(len_diff_N[unequal]))
  out["prefers_longer"] = float(prefers.mean()) if unequal.any() else None
  out["pearson"] = pearson(diff_N.astype(np.float64), len_diff_N.astype(np.float64))
  out["spearman"] = spearman(diff_N.astype(np.float64), len_diff_N.astype(np.float64))
  return out


def hardest(pairs, r_Nx2, k: int, chars: int) -> list[dict]:
  """The k most confident mistakes: most negative margins, texts cut for reading."""
  diff_N = r_Nx2[:, 0] - r_Nx2[:, 1]
  order = np.argsort(diff_N, kind="stable")[:k]
  out = []
  for i in order:
    if diff_N[i] >= 0:
      break
    p = pairs[i]
    out.append({
        "index": int(i), "where": p.where, "margin": float(diff_N[i]),
        "p_chosen": float(sigmoid(np.float64(diff_N[i]))),
        "reward_chosen": float(r_Nx2[i, 0]), "reward_rejected": float(r_Nx2[i, 1]),
        **{f: p.extra[f] for f in ("category",) if f in p.extra},
        # The prompt's end (the last turn) is what the responses answer; responses are read from the start.
        "prompt": shorten(as_text(p.prompt), chars, keep="end"),
        "chosen": shorten(as_text(p.chosen), chars), "rejected": shorten(as_text(p.rejected), chars),
    })
  return out


def analyze(pairs, r_Nx2, token_lengths_Nx2=None, target_margin_N=None, *, num_hardest: int = 10,
            text_chars: int = 300, plot_path: str | None = None, title: str = "") -> dict:
  """The whole error analysis as a JSON-serialisable dict.

  pairs: `data.Pair` records aligned with the rows of r_Nx2.
  r_Nx2: rewards, chosen first.
  token_lengths_Nx2: tokens per side as scored (prompt + response + EOS, after truncation; the prompt cancels
    in differences); None leaves the token baselines out.
  target_margin_N: the dataset's preference margins, used by the loss as in training (None: zeros).
  plot_path: where to write the reliability diagram PNG (None: no plot).
  """
  r_Nx2 = np.asarray(r_Nx2, np.float64).reshape(-1, 2)
  if len(pairs) != len(r_Nx2):
    raise ValueError(f"{len(pairs)} pairs but {len(r_Nx2)} reward rows")
  if not len(pairs):
    raise ValueError("no pairs to analyse")
  diff_N = r_Nx2[:, 0] - r_Nx2[:, 1]
  chars_Nx2 = char_lengths_Nx2(pairs)
  char_diff_N = chars_Nx2[:, 0] - chars_Nx2[:, 1]
  lengths = {"chars": char_diff_N}
  if token_lengths_Nx2 is not None:
    token_lengths_Nx2 = np.asarray(token_lengths_Nx2).reshape(-1, 2)
    lengths["tokens"] = token_lengths_Nx2[:, 0].astype(np.int64) - token_lengths_Nx2[:, 1]
  # Length bias is judged on the responses' full lengths in characters: token lengths are as scored, after
  # truncation, so with long prompts most pairs look equally long (both cut to max_length).
  unit = "chars"

  acc = accuracy(diff_N)
  baselines = {"random": 0.5}
  for u, d in lengths.items():
    baselines[f"longer_wins_{u}"] = float(correct_N(d).mean())
    baselines[f"shorter_wins_{u}"] = float(correct_N(-d).mean())
  best_name = max((k for k in baselines if k != "random"), key=lambda k: baselines[k])
  cal = calibration(diff_N)
  if plot_path:
    plot_reliability(cal, plot_path, title)
  hist_counts, hist_edges = np.histogram(diff_N, bins=NUM_HISTOGRAM_BINS)
  report = {
      "num_pairs": len(pairs),
      "accuracy": acc,
      "loss": bt_loss(diff_N, None if target_margin_N is None else np.asarray(target_margin_N, np.float64)),
      "rewards": {"chosen": moments(r_Nx2[:, 0]), "rejected": moments(r_Nx2[:, 1]), "all": moments(r_Nx2.ravel())},
      "margin": {
          **moments(diff_N),
          "quantiles": {f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, np.quantile(diff_N, QUANTILES))},
          "histogram": {"edges": hist_edges.tolist(), "counts": hist_counts.tolist()},
          "fraction_positive": float((diff_N > 0).mean()),
      },
      "baselines": baselines,
      "best_length_baseline": {"name": best_name, "accuracy": baselines[best_name]},
      "vs_best_length_baseline": acc["value"] - baselines[best_name],
      "length_bias": {"unit": unit, **length_bias(diff_N, lengths[unit])},
      "calibration": cal,
      "by_category": {f: by_category(pairs, diff_N, lengths[unit], f) for f in category_fields(pairs)},
      "hardest": hardest(pairs, r_Nx2, num_hardest, text_chars),
  }
  if "tokens" in lengths:
    report["length_bias_tokens"] = length_bias(diff_N, lengths["tokens"])
  if plot_path:
    report["reliability_plot"] = os.path.basename(plot_path)
  return report


def for_training(validation, r_Nx2, plot_path: str | None = None) -> dict:
  """The analysis of the validation split (`tokenizer.Encoded`, rewards in its pair order) for metrics.json and
  the model card: fewer, shorter hardest pairs than the CLI."""
  return analyze(validation.pairs, r_Nx2, validation.lengths(), validation.margin, num_hardest=3, text_chars=160,
                 plot_path=plot_path, title="validation")


def length_warning(report: dict) -> str | None:
  """A warning when the model is no better (or not significantly better) than a pure length heuristic."""
  best, acc = report["best_length_baseline"], report["accuracy"]
  name = best["name"].replace("_", " ").replace(" chars", " (characters)").replace(" tokens", " (tokens)")
  lo, hi = acc["ci95"]
  if acc["value"] <= best["accuracy"]:
    return (f"length: model accuracy {acc['value']:.4f} is no better than the '{name}' heuristic "
            f"({best['accuracy']:.4f}) on the same pairs; it may have learned length rather than preference")
  if lo <= best["accuracy"]:
    return (f"length: model accuracy {acc['value']:.4f} (95% CI {lo:.3f}–{hi:.3f}) is not significantly better "
            f"than the '{name}' heuristic ({best['accuracy']:.4f}); more validation pairs would tell")
  return None
