"""Buckets, the training plan and evaluation batches."""

import numpy as np

from jaxreward import pipeline, synthetic, tokenizer

PAIRS = synthetic.generate(300, 0)


def bpe():
  return tokenizer.train_bpe(tokenizer.texts_for_tokenizer(PAIRS), 400)


def test_buckets_are_few_and_cover_max_length():
  assert pipeline.bucket_lengths(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
  assert pipeline.bucket_lengths(128, 4) == [32, 64, 96, 128]


def test_plan_is_deterministic_covers_each_epoch_and_sorts_windows():
  enc = tokenizer.encode(PAIRS, bpe(), 64, "keep_end")
  plan_a, plan_b = pipeline.TrainPlan(enc, 16, 4, seed=3), pipeline.TrainPlan(enc, 16, 4, seed=3)
  np.testing.assert_array_equal(plan_a.epoch(1), plan_b.epoch(1))
  epoch0 = plan_a.epoch(0)
  assert len(set(epoch0.ravel())) == epoch0.size == (len(enc) // 16) * 16
  assert not np.array_equal(plan_a.epoch(0), plan_a.epoch(1))
  unsorted = pipeline.TrainPlan(enc, 16, 1, seed=3)
  layout = pipeline.BucketedLayout(pipeline.bucket_lengths(64, 8), 0)
  assert plan_a.padding_fraction(0, layout) < unsorted.padding_fraction(0, layout)


def test_eval_batches_cover_every_pair_once():
  enc = tokenizer.encode(PAIRS[:37], bpe(), 64, "keep_end")
  evaluation = pipeline.eval_batches(enc, np.arange(37), 16, [32, 64], 0, 0, 1)
  batches = evaluation.batches
  assert len(batches) == 3 and sum(b.weight_GxB.sum() for b in batches) == 37
  assert all(b.tokens_GxRxL.shape[:2] == (16, 2) for b in batches)
  # Batches are sorted by length; `positions` maps each real pair back to its place in the input.
  assert sorted(evaluation.positions) == list(range(37))
  first = batches[0]
  i = int(evaluation.positions[0])
  np.testing.assert_array_equal(first.tokens_GxRxL[0, 0, :len(enc.ids[i][0])], enc.ids[i][0])
