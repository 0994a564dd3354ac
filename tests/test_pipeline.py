"""Buckets, the training plan and evaluation batches."""

import jax
import numpy as np
import pytest

from jaxreward import hosts, pipeline, synthetic, tokenizer

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
  evaluation = pipeline.eval_batches(enc, np.arange(37), 16, [32, 64], 0)
  batches = evaluation.batches
  assert len(batches) == 3 and sum(b.weight_GxB.sum() for b in batches) == 37
  assert all(b.tokens_GxRxL.shape[:2] == (16, 2) for b in batches)
  # Batches are sorted by length; `positions` maps each real pair back to its place in the input.
  assert sorted(evaluation.positions) == list(range(37))
  first = batches[0]
  i = int(evaluation.positions[0])
  np.testing.assert_array_equal(first.tokens_GxRxL[0, 0, :len(enc.ids[i][0])], enc.ids[i][0])


def test_device_batch_on_a_permuted_mesh_is_the_global_batch():
  """`on_device` puts each device's rows where the mesh says, however devices are ordered (a tensor group may
  span hosts on a pod); the start-up check accepts it and names the field and rows when a device would get
  other values."""
  enc = tokenizer.encode(PAIRS, bpe(), 64, "keep_end")
  devices = np.array(jax.devices()[:8])[[0, 4, 1, 5, 2, 6, 3, 7]]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=list(devices))
  where = pipeline.Batch.sharding(mesh, (("batch", ("data", "fsdp")),))
  plan = pipeline.TrainPlan(enc, 16, 4, seed=0)
  for layout in (pipeline.BucketedLayout([32, 64], 0), pipeline.PackedLayout(64, 4, 16, 0)):
    if isinstance(layout, pipeline.PackedLayout):
      layout.fit_buckets([layout.rows_needed(enc, idx) for idx in plan.epoch(0)], 2)
    groups = layout.groups_of(16)
    np.testing.assert_array_equal(hosts.host_rows(where, groups), np.arange(groups))  # One process: all.
    assert hosts.global_leading(where, groups) == groups
    host = next(iter(pipeline.train_dataset(plan, 1, layout, where)))
    placed = host.on_device(where)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(host), strict=True):
      assert a.sharding == where
      np.testing.assert_array_equal(np.asarray(a), b)
      for shard in a.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), b[shard.index])
    hosts.check_host_rows(plan, layout, where)

  class Shifted(pipeline.BucketedLayout):  # Lays out the whole batch right, but any part of it one token off.
    def collate(self, enc, indices, weight, rows=slice(None)):
      batch = super().collate(enc, indices, weight, rows)
      return batch if isinstance(rows, np.ndarray) else batch.replace(tokens_GxRxL=batch.tokens_GxRxL + 1)

  with pytest.raises(pipeline.ConfigError, match=r"other values of \.tokens_GxRxL rows 0\.\.3 of batch 0"):
    hosts.check_host_rows(plan, Shifted([32, 64], 0), where)
