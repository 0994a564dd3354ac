"""Sequence packing: a batch's sequences laid end to end in rows of `data.pack_length` (or max_length) tokens.

Bucketing alone cannot go below the padding of one sequence per row: chosen and rejected share one width,
and a pair's sides differ in length. Packing lays sequences end to end instead, into a `pipeline.Batch` with
positions and segments: group g holds pairs g·B/G ... (g+1)·B/G - 1 of the batch. G is data x fsdp x
grad_accum_steps, so each device's microbatch is whole groups and the reward gather never crosses devices.
R varies with the batch; it is rounded up to one of a few row counts (chosen from the first epoch's batches)
so XLA compiles few programs. A pair's reward is the same packed or not: the mask and positions make each
sequence see exactly what it would see alone (tests/test_packing.py).
"""

from __future__ import annotations

import numpy as np

from jaxreward import pipeline
from jaxreward.configuration import ConfigError


def first_fit_decreasing(lengths_N: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Places sequences into rows, longest first, each into the first row with room: (row_N, offset_N, rows)."""
  row_N, offset_N = np.zeros(len(lengths_N), np.int32), np.zeros(len(lengths_N), np.int32)
  used = []  # Tokens already placed in each row.
  for i in np.argsort(-lengths_N, kind="stable"):
    n = int(lengths_N[i])
    if n > row_length:
      raise ValueError(f"a sequence of {n} tokens does not fit a row of {row_length}")
    row = next((r for r, u in enumerate(used) if u + n <= row_length), len(used))
    if row == len(used):
      used.append(0)
    row_N[i], offset_N[i] = row, used[row]
    used[row] += n
  return row_N, offset_N, len(used)


class PackedLayout:
  """Turns a batch's pair indices into the packed arrays above."""

  def __init__(self, row_length: int, groups: int, batch_size: int, pad_id: int):
    if batch_size % groups:
      raise ConfigError(f"config: train.batch_size={batch_size} does not split into {groups} packing groups "
                        "(data x fsdp x grad_accum_steps)")
    self.row_length, self.groups, self.pad_id = row_length, groups, pad_id
    # One row per sequence always suffices; the bucket set below starts as just that.
    self.row_buckets = [2 * batch_size // groups]

  def _group_lengths(self, enc, indices) -> np.ndarray:
    """[G, 2·B/G] sequence lengths, chosen and rejected of each pair side by side."""
    lengths_BxP = np.array([[len(enc.ids[i][0]), len(enc.ids[i][1])] for i in indices], np.int32)
    return lengths_BxP.reshape(self.groups, -1)

  def rows_needed(self, enc, indices) -> int:
    return max(first_fit_decreasing(lengths, self.row_length)[2] for lengths in self._group_lengths(enc, indices))

  def fit_buckets(self, rows_per_batch, num_buckets: int) -> list[int]:
    """Row counts to round up to: quantiles of the observed counts, a little headroom for later epochs (whose
    batches differ), and the count that always suffices (one row per sequence)."""
    rows = np.asarray(rows_per_batch)
    quantiles = np.quantile(rows, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
    top, always = int(rows.max()), self.row_buckets[-1]
    self.row_buckets = sorted({int(q) for q in quantiles} | {min(top + max(1, top // 8), always), always})
    return self.row_buckets

  def padded_rows(self, rows: int) -> int:
    return pipeline.smallest_fitting(self.row_buckets, rows)

  def slots(self, enc, indices) -> int:
    """Token slots the batch occupies once packed (its real tokens plus padding)."""
    return self.groups * self.padded_rows(self.rows_needed(enc, indices)) * self.row_length

  def collate(self, enc, indices: np.ndarray, weight: np.ndarray) -> pipeline.Batch:
    g_count, width = self.groups, self.row_length
    lengths_GxN = self._group_lengths(enc, indices)
    placements = [first_fit_decreasing(lengths, width) for lengths in lengths_GxN]
    rows = self.padded_rows(max(p[2] for p in placements))
    pairs_per_group = len(indices) // g_count
    tokens = np.full((g_count, rows, width), self.pad_id, np.int32)
    positions = np.zeros((g_count, rows, width), np.int32)
    segments = np.zeros((g_count, rows, width), np.int32)
    ends = np.zeros((g_count, pairs_per_group, 2), np.int32)
    for g, (row_N, offset_N, _) in enumerate(placements):
      segments_in_row = np.zeros(rows, np.int32)
      for n, (row, offset) in enumerate(zip(row_N, offset_N)):
        pair, side = divmod(n, 2)
        ids = enc.ids[indices[g * pairs_per_group + pair]][side]
        span = slice(offset, offset + len(ids))
        segments_in_row[row] += 1
        tokens[g, row, span] = ids
        positions[g, row, span] = np.arange(len(ids))
        segments[g, row, span] = segments_in_row[row]
        ends[g, pair, side] = row * width + offset + len(ids) - 1
    return pipeline.Batch(tokens_GxRxL=tokens, ends_GxBxP=ends,
                          weight_GxB=weight.astype(np.float32).reshape(g_count, -1),
                          margin_GxB=enc.margin[indices].reshape(g_count, -1), positions_GxRxL=positions,
                          segments_GxRxL=segments)
