"""Error-analysis metrics on constructed data whose answers are known in advance."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from jaxreward import analysis, report
from jaxreward.data import Pair


def make_pairs(chosen_lengths, rejected_lengths, categories=None):
  """Pairs whose responses are 'x' * length, so lengths in characters are exact."""
  pairs = []
  for i, (a, b) in enumerate(zip(chosen_lengths, rejected_lengths)):
    extra = {} if categories is None else {"category": categories[i]}
    pairs.append(Pair(f"prompt {i}", "x" * int(a), "y" * int(b), extra=extra, where=f"f:{i + 1}"))
  return pairs


# --- Elementary metrics ------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
  # Wilson (1927) / standard tables: 8 of 10 -> [0.4902, 0.9433]; 50 of 100 -> [0.4038, 0.5962].
  lo, hi = analysis.wilson_interval(8, 10)
  assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
  lo, hi = analysis.wilson_interval(50, 100)
  assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
  # All right: the upper end is 1 and the lower end is n / (n + z²), not 1 as the normal approximation says.
  lo, hi = analysis.wilson_interval(20, 20)
  assert hi == pytest.approx(1.0) and lo == pytest.approx(20 / (20 + analysis.Z95 ** 2), abs=1e-9)
  assert analysis.wilson_interval(0, 0) == (0.0, 1.0)
  for k, n in ((0, 7), (3, 4), (8, 10), (61, 97)):  # Whole successes: scipy's Wilson interval.
    ci = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
    np.testing.assert_allclose(analysis.wilson_interval(k, n), (ci.low, ci.high), atol=1e-12)


def test_accuracy_ties_count_half_and_loss():
  diff = np.array([1.0, -1.0, 0.0, 2.0])
  acc = analysis.accuracy(diff)
  assert acc["value"] == pytest.approx(2.5 / 4) and acc["n"] == 4
  # −log σ(x) for x = 1, −1, 0, 2.
  expected = np.mean([math.log1p(math.exp(-x)) for x in diff])
  assert analysis.bt_loss(diff) == pytest.approx(expected)
  # The dataset margin shifts the target exactly as in training: −log σ(m − target).
  assert analysis.bt_loss(np.array([1.0]), np.array([1.0])) == pytest.approx(math.log(2.0))


def test_rank_correlations_match_definitions():
  # Ties take their average rank: ranks [1, 2.5, 2.5, 4, 5] against [1, 2, 3, 4, 5].
  x = np.array([1.0, 2.0, 2.0, 5.0, 7.0])
  ranks = np.array([1, 2.5, 2.5, 4, 5])
  assert analysis.spearman(x, np.arange(5.0)) == pytest.approx(np.corrcoef(ranks, np.arange(5.0))[0, 1])
  # Any strictly monotone transform has Spearman 1 but Pearson < 1.
  y = np.exp(np.arange(6.0))
  assert analysis.spearman(np.arange(6.0), y) == pytest.approx(1.0)
  assert analysis.pearson(np.arange(6.0), y) < 0.95
  assert analysis.pearson(np.arange(5.0), -2 * np.arange(5.0) + 3) == pytest.approx(-1.0)
  assert analysis.pearson(np.arange(5.0), np.ones(5)) is None  # Undefined, not 0.


# --- Baselines and length bias -------------------------------------------------------------------------------


def test_length_baselines_on_known_pairs():
  # Chosen longer in 3 pairs, shorter in 1, equal in 1 (a tie: half a point to each heuristic).
  pairs = make_pairs([10, 20, 30, 5, 7], [5, 10, 10, 9, 7])
  r = np.zeros((5, 2))
  rep = analysis.analyze(pairs, r)
  assert rep["baselines"]["longer_wins_chars"] == pytest.approx(3.5 / 5)
  assert rep["baselines"]["shorter_wins_chars"] == pytest.approx(1.5 / 5)
  assert rep["baselines"]["random"] == 0.5
  assert rep["accuracy"]["value"] == 0.5  # A constant scorer ties everywhere.
  assert rep["best_length_baseline"]["name"] == "longer_wins_chars"
  # Token lengths (as scored, after truncation), when given, get their own baselines and length-bias section.
  tokens = np.array([[3, 1], [1, 3], [2, 2], [1, 2], [5, 4]])
  rep = analysis.analyze(pairs, r, token_lengths_Nx2=tokens)
  assert rep["baselines"]["longer_wins_tokens"] == pytest.approx(2.5 / 5)
  assert rep["length_bias"]["unit"] == "chars"
  assert rep["length_bias_tokens"]["chosen_longer"]["n"] == 2 and rep["length_bias_tokens"]["equal_length"]["n"] == 1


def test_length_preferring_scorer_shows_length_bias():
  rng = np.random.default_rng(0)
  n = 400
  chosen_len, rejected_len = rng.integers(5, 200, n), rng.integers(5, 200, n)
  pairs = make_pairs(chosen_len, rejected_len)
  # The reward is length plus a little noise: it knows nothing about which response people chose.
  r = np.stack([chosen_len, rejected_len], axis=1) / 50.0 + rng.normal(0, 0.05, (n, 2))
  rep = analysis.analyze(pairs, r)
  lb = rep["length_bias"]
  assert lb["chosen_longer"]["accuracy"] > 0.95 and lb["chosen_shorter"]["accuracy"] < 0.05
  assert lb["accuracy_gap"] > 0.9 and lb["prefers_longer"] > 0.95
  assert lb["pearson"] > 0.95 and lb["spearman"] > 0.95
  assert rep["accuracy"]["value"] == pytest.approx(rep["baselines"]["longer_wins_chars"], abs=0.03)
  assert "no better than" in analysis.length_warning(rep) or "not significantly" in analysis.length_warning(rep)


def test_length_neutral_scorer_shows_no_bias_and_no_warning():
  rng = np.random.default_rng(1)
  n = 600
  pairs = make_pairs(rng.integers(5, 200, n), rng.integers(5, 200, n))
  # Right 90% of the time whatever the lengths.
  right = rng.random(n) < 0.9
  r = np.stack([np.where(right, 1.0, -1.0), np.zeros(n)], axis=1)
  rep = analysis.analyze(pairs, r)
  lb = rep["length_bias"]
  assert abs(lb["accuracy_gap"]) < 0.08 and abs(lb["pearson"]) < 0.1
  assert rep["accuracy"]["value"] == pytest.approx(right.mean())
  assert analysis.length_warning(rep) is None


# --- Calibration --------------------------------------------------------------------------------------------


def test_perfectly_calibrated_scorer_has_small_ece():
  rng = np.random.default_rng(2)
  n = 200_000
  m = rng.normal(0, 2.0, n)
  # The chosen side is the higher-scored one with probability exactly σ(margin of the higher one).
  p_high_wins = analysis.sigmoid(np.abs(m))
  high_wins = rng.random(n) < p_high_wins
  diff = np.where(high_wins, np.abs(m), -np.abs(m))
  cal = analysis.calibration(diff)
  assert cal["ece"] < 0.005
  assert sum(b["n"] for b in cal["bins"]) == n


def test_overconfident_scorer_has_known_ece():
  # Margins of 10 (confidence σ(10) ≈ 1) on pairs that are right only 70% of the time: ECE = σ(10) − 0.7.
  diff = np.array([10.0] * 70 + [-10.0] * 30)
  cal = analysis.calibration(diff)
  assert cal["ece"] == pytest.approx(analysis.sigmoid(10.0) - 0.7, abs=1e-9)
  assert [b["n"] for b in cal["bins"]][-1] == 100


def test_reliability_plot_written(tmp_path):
  pairs = make_pairs([3, 4, 5, 6], [1, 2, 3, 9])
  path = tmp_path / "plots" / "reliability.png"
  rep = analysis.analyze(pairs, np.array([[1.0, 0.0], [0.2, 0.0], [3.0, 0.0], [-2.0, 0.0]]), plot_path=str(path))
  assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
  assert rep["reliability_plot"] == "reliability.png"


# --- Categories, hardest pairs, serialisation -----------------------------------------------------------------


def test_accuracy_by_category():
  cats = ["a"] * 4 + ["b"] * 6
  pairs = make_pairs([5] * 10, [3] * 10, categories=cats)
  diff = np.array([1, 1, 1, -1] + [1, -1, -1, -1, -1, 0], float)
  rep = analysis.analyze(pairs, np.stack([diff, np.zeros(10)], axis=1))
  by = rep["by_category"]["category"]
  assert by["a"]["n"] == 4 and by["a"]["accuracy"] == pytest.approx(0.75)
  assert by["b"]["n"] == 6 and by["b"]["accuracy"] == pytest.approx(1.5 / 6)
  assert by["b"]["longer_wins"] == 1.0
  lo, hi = analysis.wilson_interval(3, 4)
  assert by["a"]["ci95"] == [pytest.approx(lo), pytest.approx(hi)]
  assert list(by) == ["b", "a"]  # Most pairs first.


def test_category_fields_skip_ids_and_nested_values():
  pairs = make_pairs([5] * 6, [3] * 6)
  for i, p in enumerate(pairs):
    p.extra = {"id": f"row{i}", "source": "ab"[i % 2], "meta": {"x": 1}, "category": "c"}
  # 'id' is unique per pair, 'meta' is nested, 'category' has one value: only 'source' is a category field.
  assert analysis.category_fields(pairs) == ["source"]


def test_hardest_pairs_are_the_most_confident_mistakes_truncated():
  long_text = "word " * 200
  pairs = [Pair("p" * 500 + " END", long_text, "b", where=f"f:{i}") for i in range(4)]
  r = np.array([[0.0, 3.0], [0.0, 1.0], [2.0, 0.0], [0.0, 5.0]])
  rep = analysis.analyze(pairs, r, num_hardest=10, text_chars=50)
  assert [h["index"] for h in rep["hardest"]] == [3, 0, 1]  # Right answers are not mistakes.
  h = rep["hardest"][0]
  assert h["margin"] == -5.0 and h["p_chosen"] == pytest.approx(analysis.sigmoid(-5.0))
  assert len(h["chosen"]) <= 52 and h["chosen"].endswith("…")
  assert h["prompt"].endswith("END") and h["prompt"].startswith("…")  # The prompt keeps its end.


def test_conversational_pairs_and_json_round_trip(tmp_path):
  prompt = [{"role": "user", "content": "hi"}]
  pairs = [Pair(prompt, [{"role": "assistant", "content": "hello there"}], [{"role": "assistant", "content": "go"}],
                extra={"category": "chat"}) for _ in range(3)]
  pairs.append(Pair(prompt, [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "bbb"}],
                    extra={"category": "other"}))
  rep = analysis.analyze(pairs, np.array([[1.0, 0.0]] * 3 + [[-1.0, 0.0]]))
  # Characters of the message contents: "hello there" (11) vs "go" (2).
  assert rep["baselines"]["longer_wins_chars"] == pytest.approx(0.75)
  assert rep["hardest"][0]["chosen"] == "assistant: a"
  text = json.dumps(rep, allow_nan=False)  # Strict JSON: no NaN anywhere.
  assert json.loads(text)["num_pairs"] == 4
  summary = report.analysis_text(rep)
  assert "accuracy by category" in summary and "longer_wins_chars" in summary
  md = report.analysis_markdown(rep)
  assert md.startswith("## Error analysis") and "| this model | 0.7500 |" in md


def test_analyze_rejects_misaligned_inputs():
  with pytest.raises(ValueError, match="3 pairs but 2 reward rows"):
    analysis.analyze(make_pairs([1, 2, 3], [3, 2, 1]), np.zeros((2, 2)))


def test_for_training_reads_rewards_in_pair_order():

  class Enc:
    pass

  enc = Enc()
  enc.pairs = make_pairs([4, 9, 2], [1, 1, 1])
  ids = [[np.zeros(5), np.zeros(2)], [np.zeros(10), np.zeros(2)], [np.zeros(3), np.zeros(2)]]
  enc.lengths = lambda: np.array([[len(a), len(b)] for a, b in ids])
  enc.margin = np.zeros(3, np.float32)
  rep = analysis.for_training(enc, np.array([[1.0, 0.0], [-2.0, 0.0], [3.0, 0.0]]))
  assert rep["hardest"][0]["index"] == 1 and rep["hardest"][0]["margin"] == -2.0
