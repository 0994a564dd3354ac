"""End to end: a tiny run has a pulse, writes every output, and resumes exactly."""

import json
import os

import numpy as np
import pytest

from jaxreward import artifacts, checkpoint, train

METRICS_KEYS = {"train_accuracy", "val_accuracy", "overfitting_gap", "num_parameters", "training_steps", "best_step",
                "random_baseline_accuracy", "gate", "padding_fraction", "truncated_pairs", "dropped_pairs"}


@pytest.fixture(scope="module")
def finished_run(tiny_run):
  return tiny_run["config"], tiny_run["workdir"], tiny_run["summary"]


def test_has_a_pulse(finished_run):
  _, workdir, summary = finished_run
  for name in ("metrics.json", "metrics.jsonl", "learning_curves.png", "README.md", "config.json",
               "tokenizer/tokenizer.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert METRICS_KEYS <= set(metrics)
  assert set(metrics["gate"]["criteria"]) == {"train_accuracy", "val_accuracy", "overfitting_gap", "loss_converged"}
  assert metrics["training_steps"] == 20 and summary["gate_pass"] == metrics["gate"]["pass"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["kind"] == "train"]
  # The loss moves: the model is learning something on the synthetic task.
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [10, 20]
  # Padding is reported per epoch: a row at each epoch's first step, and the list in metrics.json.
  epochs = [r for r in rows if r["kind"] == "epoch"]
  assert [r["epoch"] for r in epochs] == list(range(len(metrics["padding_fraction_by_epoch"])))
  assert [r["padding_fraction"] for r in epochs] == metrics["padding_fraction_by_epoch"]
  assert metrics["packing"] and 0 <= metrics["padding_fraction"] < 0.5
  # The same rows as TensorBoard scalars (tests/test_report.py reads such files back).
  assert [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents.")]


def test_best_and_latest_are_both_kept(finished_run):
  config, workdir, summary = finished_run
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_best)
  assert ckpt.latest_step() == 20
  assert summary["best_step"] in ckpt.all_steps()
  evals = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  best_acc = max(r["val_accuracy"] for r in evals if r["kind"] == "eval")
  assert summary["val_accuracy"] == best_acc
  ckpt.close()


def test_checkpoint_round_trip_scores_the_same(finished_run):
  config, workdir, _ = finished_run
  loaded = artifacts.load(workdir, "latest")
  assert loaded.step == 20
  tokens = np.array([[5, 6, 7, 8, 1]], np.int32)
  r1 = np.asarray(loaded.model(tokens, np.array([5])))
  r2 = np.asarray(artifacts.load(workdir, "latest").model(tokens, np.array([5])))
  np.testing.assert_array_equal(r1, r2)
  del config


def test_interrupted_run_resumes_to_identical_results(finished_run, tmp_path):
  from tests.conftest import load_config
  _, _, uninterrupted = finished_run
  config = load_config("tiny")
  config.mesh.data = 1
  config.train.max_steps_per_run = 7  # Stops mid-interval, between evaluations.
  first = train.train_and_evaluate(config, str(tmp_path))
  assert first["preempted"] and first["stopped_at"] == 7
  config.train.max_steps_per_run = 0
  resumed = train.train_and_evaluate(config, str(tmp_path))
  for key in ("val_accuracy", "train_accuracy", "val_loss", "train_loss", "best_step"):
    assert resumed[key] == uninterrupted[key], key


def test_bucketed_run_without_packing(tmp_path):
  """data.packing=False: length-sorted B x 2 x L batches through the whole job."""
  from tests.conftest import load_config
  config = load_config("tiny")
  config.mesh.data = 1
  config.data.packing = False
  config.train.num_steps, config.train.eval_every = 6, 6
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert not summary["packing"] and summary["training_steps"] == 6 and np.isfinite(summary["val_loss"])
  assert len(summary["padding_fraction_by_epoch"]) == 1 and 0 < summary["padding_fraction"] < 1


def _one_step(grad_accum_steps, margin=0.0, packed=False):
  from tests.conftest import load_config
  from jaxreward import model as model_lib, pipeline, sharding, state, synthetic, tokenizer
  config = load_config("tiny")
  pairs = synthetic.generate(64, 0)
  tok = tokenizer.train_bpe(tokenizer.texts_for_tokenizer(pairs), 300)
  enc = tokenizer.encode(pairs, tok, 64, "keep_end")
  config.mesh.data = 1
  config.train.grad_accum_steps, config.train.center_rewards_coef = grad_accum_steps, 0.0
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  trainer = state.Trainer(model_lib.ModelConfig.from_config(config.model, len(tok)), config.train, mesh, rule_table,
                          10)
  if packed:  # One packing group per microbatch: the rows differ with grad_accum_steps, the update must not.
    batch = pipeline.PackedLayout(64, grad_accum_steps, 16, tok.pad_token_id).collate(enc, np.arange(16), np.ones(16))
  else:
    batch = pipeline.collate(enc, np.arange(16), np.ones(16), [32, 64], tok.pad_token_id)
  batch = batch.replace(margin_GxB=np.full_like(batch.margin_GxB, margin))
  before = jax.device_get(trainer.state["params"])
  for _ in range(3):  # Past the warmup's zero learning rate.
    metrics = trainer.step(batch)
  return before, jax.device_get(trainer.state["params"]), jax.device_get(metrics)


import jax  # noqa: E402  (used by the helpers below only)


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_accumulation_equals_the_big_batch(packed):
  _, full, m_full = _one_step(1, packed=packed)
  _, accumulated, m_acc = _one_step(4, packed=packed)
  assert abs(float(m_full["loss"]) - float(m_acc["loss"])) < 1e-4
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accumulated)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_step_leaves_the_state_untouched():
  before, after, metrics = _one_step(1, margin=float("nan"))
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_loudly_or_is_skipped(tmp_path):
  from tests.conftest import load_config
  config = load_config("tiny")
  config.mesh.data = 1
  config.train.learning_rate = 1e30
  config.train.warmup_steps = 0
  config.train.grad_clip_norm = 0.0
  with pytest.raises(train.NonFiniteLoss, match=r"at step \d+"):
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  config.train.nan_policy = "skip"
  summary = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert summary["skipped_steps"] and summary["training_steps"] == 20


def test_loss_converged_definition():
  from jaxreward import gate
  # Still falling fast relative to everything: not converged.
  assert not gate.loss_converged([0.69, 0.60, 0.45], 0.10, 0.02)[0]
  # Near zero the loss halves cheaply, but the step is tiny against the total drop: a plateau.
  assert gate.loss_converged([0.45, 0.17, 0.0345, 0.0044], 0.10, 0.02)[0]
  assert gate.loss_converged([0.70, 0.52, 0.51], 0.10, 0.0)[0]
  assert not gate.loss_converged([0.5], 0.10, 0.02)[0]
