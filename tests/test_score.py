"""evaluate / score on a tiny trained model: CLI outputs, normalisation, agreement between paths, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, xla_flags

from jaxreward import corpus, score
from jaxreward.commands import evaluate as evaluate_cmd, score as score_cmd


def write_pairs(path, pairs):
  with open(path, "w") as f:
    for p in pairs:
      f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **p.extra}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
  """The session's tiny model, and its validation split as a JSONL file."""
  config, workdir, summary = tiny_run["config"], tiny_run["workdir"], tiny_run["summary"]
  root = tmp_path_factory.mktemp("score")
  validation = corpus.prepare(config, lambda _: None).validation
  return {"workdir": workdir, "summary": summary, "validation": validation, "root": root,
          "val_path": write_pairs(root / "val.jsonl", validation.pairs)}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_evaluate_cli_reproduces_training_validation(run, capsys):
  out = run["root"] / "eval_val"
  assert evaluate_cmd.main(["--workdir", run["workdir"], "--data", run["val_path"], "--out", str(out)]) == 0
  for name in ("report.json", "summary.txt", "reliability.png"):
    assert (out / name).stat().st_size > 0, name
  report = json.loads((out / "report.json").read_text())
  s = run["summary"]
  # Same pairs, same checkpoint (best), same tokenization: the numbers training saved come back.
  assert report["meta"]["checkpoint_step"] == s["best_step"]
  assert report["num_pairs"] == s["val_pairs"]
  assert report["accuracy"]["value"] == pytest.approx(s["val_accuracy"], abs=1e-6)
  assert report["loss"] == pytest.approx(s["val_loss"], abs=1e-4)
  assert report["rewards"]["all"]["mean"] == pytest.approx(s["val_reward_mean"], abs=1e-4)
  assert report["rewards"]["all"]["std"] == pytest.approx(s["val_reward_std"], abs=1e-4)
  # The numpy analysis agrees with the jitted eval step's own sums.
  assert report["loss"] == pytest.approx(report["meta"]["eval_step_loss"], abs=1e-5)
  lo, hi = report["accuracy"]["ci95"]
  assert lo < report["accuracy"]["value"] < hi
  assert set(report["baselines"]) >= {"random", "longer_wins_tokens", "shorter_wins_tokens", "longer_wins_chars"}
  # The synthetic task's three kinds of request.
  assert set(report["by_category"]["category"]) == {"compare", "maximum", "category"}
  assert sum(c["n"] for c in report["by_category"]["category"].values()) == report["num_pairs"]
  assert report["calibration"]["ece"] is not None and len(report["calibration"]["bins"]) == 10
  printed = capsys.readouterr().out
  assert "baselines on the same pairs" in printed and "calibration: ECE" in printed


def test_score_cli_normalised_validation_rewards(run, capsys):
  out = run["root"] / "val_scores.jsonl"
  assert score_cmd.main(["--model", run["workdir"], "--data", run["val_path"], "--out", str(out)]) == 0
  rows = read_jsonl(out)
  assert len(rows) == len(run["validation"])
  r = np.array([[row["reward_chosen"], row["reward_rejected"]] for row in rows])
  z = np.array([[row["reward_chosen_normalized"], row["reward_rejected_normalized"]] for row in rows])
  mean, std = run["summary"]["val_reward_mean"], run["summary"]["val_reward_std"]
  np.testing.assert_allclose(z, (r - mean) / std, rtol=1e-5, atol=1e-5)
  # Normalised with the validation statistics, the validation rewards are N(0, 1)-like.
  assert z.mean() == pytest.approx(0.0, abs=1e-3) and z.std() == pytest.approx(1.0, abs=1e-3)
  diff = r[:, 0] - r[:, 1]
  accuracy = np.mean(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0)))
  assert accuracy == pytest.approx(run["summary"]["val_accuracy"], abs=1e-6)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == len(rows)
  np.testing.assert_allclose([row["margin"] for row in rows], diff, atol=1e-6)
  run["pair_scores"] = r


def test_hardest_pairs_align_with_scores(run):
  """evaluate (sharded, length-sorted batches) and score (single device) give each pair the same rewards."""
  report = json.loads((run["root"] / "eval_val" / "report.json").read_text())
  r = run.get("pair_scores")
  if r is None:
    pytest.skip("needs test_score_cli_normalised_validation_rewards")
  assert report["hardest"], "a tiny model makes mistakes"
  for h in report["hardest"]:
    np.testing.assert_allclose([h["reward_chosen"], h["reward_rejected"]], r[h["index"]], atol=1e-4)


def test_load_scorer_api_responses_and_bucketing(run, tmp_path):
  import jaxreward  # pylint: disable=g-import-not-at-top
  scorer = jaxreward.load_scorer(run["workdir"])
  pairs = run["validation"].pairs[:7]
  prompts, chosen = [p.prompt for p in pairs], [p.chosen for p in pairs]
  r = scorer(prompts, chosen)
  assert r.shape == (7,) and r.dtype == np.float32
  # The same sequences alone, and inside batches of other sizes, get the same rewards.
  np.testing.assert_allclose(scorer(prompts[:3], chosen[:3]), r[:3], atol=1e-5)
  np.testing.assert_allclose(scorer(prompts[2:6], chosen[2:6]), r[2:6], atol=1e-5)
  # Calls of 7, 3 and 4 rows reuse compiled shapes: (4 or 16 rows) x (bucket lengths) at most.
  assert scorer.backend._fn._cache_size() <= 2 * len(scorer.buckets)
  mean, std = run["summary"]["val_reward_mean"], run["summary"]["val_reward_std"]
  np.testing.assert_allclose(scorer(prompts, chosen, normalized=True), (r - mean) / std, rtol=1e-5, atol=1e-5)
  # {"prompt", "response"} rows through the CLI give the same values.
  data = tmp_path / "responses.jsonl"
  data.write_text("".join(json.dumps({"prompt": p, "response": c, "id": i}) + "\n"
                          for i, (p, c) in enumerate(zip(prompts, chosen))))
  assert score_cmd.main(["--model", run["workdir"], "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 0
  rows = read_jsonl(tmp_path / "o.jsonl")
  assert [row["id"] for row in rows] == list(range(7))
  np.testing.assert_allclose([row["reward"] for row in rows], r, atol=1e-5)
  np.testing.assert_allclose([row["reward_normalized"] for row in rows], (r - mean) / std, rtol=1e-4, atol=1e-4)


def test_scorer_truncates_like_training(run):
  scorer = score.load_scorer(run["workdir"])
  long_response = " 7" * 500  # Far beyond max_length: keep_end keeps the response's end and the EOS.
  ids = scorer.encode(["Which is larger?"], [long_response])[0]
  assert len(ids) == scorer.max_length and ids[-1] == scorer.tokenizer.eos_token_id
  assert np.isfinite(scorer(["Which is larger?"], [long_response])).all()


def _random_hf_folder(run, folder):
  """An HF reward-model folder as an export would write it: random Llama weights, the run's tokenizer."""
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxreward import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(os.path.join(run["workdir"], "tokenizer"))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
  model = transformers.LlamaForSequenceClassification(cfg)
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  with open(os.path.join(folder, "reward_normalization.json"), "w") as f:
    json.dump({"mean": 0.25, "std": 2.0, "max_length": 64}, f)
  return model, tok


def test_hf_folder_evaluate_and_score(run, tmp_path):
  folder = str(tmp_path / "hf")
  model, tok = _random_hf_folder(run, folder)
  import torch  # pylint: disable=g-import-not-at-top
  pairs = run["validation"].pairs[:40]
  data = write_pairs(tmp_path / "pairs.jsonl", pairs)
  assert evaluate_cmd.main(["--workdir", folder, "--data", data, "--out", str(tmp_path / "ev")]) == 0
  report = json.loads((tmp_path / "ev" / "report.json").read_text())
  assert report["meta"]["kind"] == "hf" and report["num_pairs"] == 40
  assert score_cmd.main(["--model", folder, "--data", data, "--out", str(tmp_path / "s.jsonl")]) == 0
  rows = read_jsonl(tmp_path / "s.jsonl")
  # Reference: transformers itself on each text (prompt + response + EOS), one at a time, no padding.
  for row, p in list(zip(rows, pairs))[:5]:
    ids = tok(p.prompt, add_special_tokens=True)["input_ids"] + tok(p.chosen, add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
      want = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert row["reward_chosen"] == pytest.approx(want, abs=1e-4)
    assert row["reward_chosen_normalized"] == pytest.approx((want - 0.25) / 2.0, abs=1e-4)
  r = np.array([[row["reward_chosen"], row["reward_rejected"]] for row in rows])
  for h in report["hardest"]:
    np.testing.assert_allclose([h["reward_chosen"], h["reward_rejected"]], r[h["index"]], atol=1e-4)


def test_torch_backend_matches_padded_batches(run, tmp_path):
  """The transformers fallback on right-padded bucket batches equals unpadded scoring."""
  folder = str(tmp_path / "hf")
  model, tok = _random_hf_folder(run, folder)
  import torch  # pylint: disable=g-import-not-at-top
  scorer = score.Scorer(score._TorchBackend(folder), tok, 64, 4, 0.25, 2.0, folder)
  prompts, responses = ["Which is larger, 3 or 9?\nAnswer:", "Name a fruit.\nAnswer:"], [" 9 is larger.", " plum."]
  got = scorer(prompts, responses)
  for ids, value in zip(scorer.encode(prompts, responses), got):
    with torch.no_grad():
      assert value == pytest.approx(float(model(input_ids=torch.tensor([ids.tolist()])).logits[0, 0]), abs=1e-5)


# --- Bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["workdir", "data", "not_a_run", "step", "bad_row"])
def test_bad_paths_are_one_line_errors(run, tmp_path, capsys, which):
  args = {"model": run["workdir"], "data": run["val_path"], "checkpoint": "best"}
  expect = {"workdir": "no such file or directory", "data": "no such file", "not_a_run": "neither a jaxreward",
            "step": "no checkpoint at step 999", "bad_row": "expected"}[which]
  if which == "workdir":
    args["model"] = str(tmp_path / "missing")
  elif which == "data":
    args["data"] = str(tmp_path / "missing.jsonl")
  elif which == "not_a_run":
    args["model"] = str(tmp_path)
  elif which == "step":
    args["checkpoint"] = "999"
  else:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    args["data"] = str(tmp_path / "bad.jsonl")
  rc_eval = evaluate_cmd.main(["--workdir", args["model"], "--data", args["data"], "--checkpoint", args["checkpoint"],
                           "--out", str(tmp_path / "o")])
  err_eval = capsys.readouterr().err.strip()
  rc_score = score_cmd.main(["--model", args["model"], "--data", args["data"], "--checkpoint", args["checkpoint"],
                         "--out", str(tmp_path / "o.jsonl")])
  err_score = capsys.readouterr().err.strip()
  assert rc_eval == 2 and rc_score == 2
  for err in (err_eval, err_score):
    assert err.startswith("error: ") and "\n" not in err, err
  assert expect in err_score
  if which != "bad_row":  # evaluate reads pairs; a row with neither response nor chosen is data.py's message.
    assert expect in err_eval


def test_cli_error_in_a_fresh_process_has_no_traceback(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  proc = subprocess.run([sys.executable, "-m", "jaxreward.evaluate", "--workdir", str(tmp_path / "nope"), "--data",
                         str(tmp_path / "d.jsonl")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_row_plan_covers_rows_with_little_filler():
  for n in range(0, 300):
    plan = score.row_plan(n)
    assert all(rows in score.ROW_BUCKETS for rows in plan)
    # Every row is scored, and dropping any batch would leave rows unscored.
    assert sum(plan) >= n and all(sum(plan) - rows < n for rows in plan), (n, plan)
  assert score.row_plan(30) == [16, 16] and score.row_plan(5) == [4, 4] and score.row_plan(64) == [64]
