"""End to end: a tiny run has a pulse, writes every output, and resumes exactly."""

import json
import os

import numpy as np
import pytest

from jaxreward import artifacts, checkpoint, train

METRICS_KEYS = {"train_accuracy", "val_accuracy", "overfitting_gap", "num_parameters", "training_steps", "best_step",
                "random_baseline_accuracy", "gate", "padding_fraction", "truncated_pairs", "dropped_pairs"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  from tests.conftest import load_config
  config = load_config("tiny")
  config.mesh.data = 1
  workdir = str(tmp_path_factory.mktemp("tiny"))
  summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary


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
