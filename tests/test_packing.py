"""Packing: every sequence placed once, intact, and scored exactly as it would be alone."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxreward import model as model_lib, pipeline, synthetic, tokenizer
from jaxreward.configuration import ConfigError

CFG = model_lib.ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, qkv_bias=True)


@pytest.fixture(scope="module")
def enc():
  pairs = synthetic.generate(120, 0)
  tok = tokenizer.train_bpe(tokenizer.texts_for_tokenizer(pairs), 300)
  return tokenizer.encode(pairs, tok, 64, "keep_end")


def test_first_fit_decreasing_places_every_sequence_without_overlap():
  lengths = np.random.default_rng(0).integers(1, 65, size=50)
  row_N, offset_N, rows = pipeline.first_fit_decreasing(lengths, 64)
  assert rows >= -(-lengths.sum() // 64)
  occupied = np.zeros((rows, 64), int)
  for n, r, o in zip(lengths, row_N, offset_N):
    occupied[r, o:o + n] += 1
  assert occupied.max() == 1 and occupied.sum() == lengths.sum()
  with pytest.raises(ValueError, match="does not fit"):
    pipeline.first_fit_decreasing(np.array([65]), 64)


def test_collate_lays_out_each_sequence_intact(enc):
  layout = pipeline.PackedLayout(64, 2, 16, pad_id=0)
  indices = np.arange(3, 19)
  batch = layout.collate(enc, indices, np.ones(16))
  tokens, positions, segments, ends = batch.tokens_GxRxL, batch.positions_GxRxL, batch.segments_GxRxL, batch.ends_GxBxP
  assert ends.shape == (2, 8, 2) and batch.weight_GxB.shape == (2, 8)
  real = sum(len(enc.ids[i][0]) + len(enc.ids[i][1]) for i in indices)
  assert (segments > 0).sum() == real == batch.real_tokens()
  for g in range(2):
    for b in range(8):
      for p in range(2):
        ids = enc.ids[indices[g * 8 + b]][p]
        row, end = divmod(int(ends[g, b, p]), 64)
        start = end - len(ids) + 1
        np.testing.assert_array_equal(tokens[g, row, start:end + 1], ids)
        np.testing.assert_array_equal(positions[g, row, start:end + 1], np.arange(len(ids)))
        assert len(set(segments[g, row, start:end + 1])) == 1 and segments[g, row, start] > 0
  np.testing.assert_array_equal(batch.margin_GxB.ravel(), enc.margin[indices])


def test_row_buckets_cover_every_batch_and_stay_few(enc):
  layout = pipeline.PackedLayout(64, 1, 32, pad_id=0)
  plan = pipeline.TrainPlan(enc, 32, 1, seed=0)
  needed = [layout.rows_needed(enc, idx) for idx in plan.epoch(0)]
  buckets = layout.fit_buckets(needed, 4)
  assert len(buckets) <= 6 and buckets[-1] == 64 and max(needed) in buckets
  for idx in plan.epoch(1):  # A later epoch's batches also find a bucket.
    assert layout.padded_rows(layout.rows_needed(enc, idx)) >= layout.rows_needed(enc, idx)
  bucketed = plan.padding_fraction(0, pipeline.BucketedLayout(pipeline.bucket_lengths(64, 4), 0))
  assert plan.padding_fraction(0, layout) < bucketed


def test_groups_must_divide_the_batch():
  with pytest.raises(ConfigError, match="packing groups"):
    pipeline.PackedLayout(64, 3, 16, pad_id=0)


def test_packed_rewards_equal_one_sequence_per_row(enc):
  with nnx.use_eager_sharding(False):
    model = model_lib.RewardModel(CFG, nnx.Rngs(0))
  indices = np.arange(24)
  layout = pipeline.PackedLayout(64, 3, 24, pad_id=0)
  layout.fit_buckets([layout.rows_needed(enc, indices)], 1)
  packed = layout.collate(enc, indices, np.ones(24))
  assert packed.tokens_GxRxL.shape[1] < 16, "several sequences share each row"
  assert packed.segments_GxRxL is not None
  score = nnx.jit(lambda m, *a: m.score(*a))  # Compiled: op by op, the blockwise attention's loops take a minute.
  r_GxBxP = score(model, packed.tokens_GxRxL, packed.ends_GxBxP, packed.positions_GxRxL, packed.segments_GxRxL)
  plain = pipeline.collate(enc, indices, np.ones(24), [64], 0)
  assert plain.segments_GxRxL is None and plain.tokens_GxRxL.shape[1] == 2, "one sequence per row"
  r_Bx1x2 = score(model, plain.tokens_GxRxL, plain.ends_GxBxP)
  np.testing.assert_allclose(np.asarray(r_GxBxP).reshape(-1, 2), np.asarray(r_Bx1x2).reshape(-1, 2), atol=1e-5)


def test_rows_barely_wider_than_the_longest_sequence_pack_worse(enc):
  """The synthetic sequences run up to 44 tokens: rows of 48 hold one long one and little else."""
  assert enc.lengths().max() <= 48
  plan = pipeline.TrainPlan(enc, 16, 1, seed=0)
  padding = {}
  for width in (48, 64):
    layout = pipeline.PackedLayout(width, 1, 16, pad_id=0)
    layout.fit_buckets([layout.rows_needed(enc, idx) for idx in plan.epoch(0)], 4)
    padding[width] = plan.padding_fraction(0, layout)
  assert padding[64] < padding[48] - 0.05, padding


@pytest.mark.parametrize("packed", [False, True])
def test_each_host_lays_out_only_its_groups(enc, packed):
  """A host's rows (contiguous, or several blocks when a tensor group spans hosts), collated alone, are those rows
  of the global batch: same shapes, same values."""
  indices = np.arange(16)
  if packed:
    layout = pipeline.PackedLayout(64, 4, 16, pad_id=0)
    layout.fit_buckets([layout.rows_needed(enc, indices)], 1)
  else:
    layout = pipeline.BucketedLayout([32, 64], 0)
  whole = layout.collate(enc, indices, np.ones(16))
  groups = layout.groups_of(16)
  for rows in (np.arange(groups // 2), np.arange(groups // 2, groups), np.r_[0:groups // 4, groups // 2:groups * 3 // 4]):
    mine = layout.collate(enc, indices, np.ones(16), rows)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(whole), strict=True):
      np.testing.assert_array_equal(a, b[rows])
