"""Token ids -> batches: the training plan, the two layouts, packing, the grain iterator, evaluation batches.

Every batch, packed or not, is one `Batch` (below): G groups of R rows of L tokens that hold the sequences of
the group's B/G pairs, plus where each side's EOS lies. The model reads it through one entry point
(`RewardModel.score`), the loss through one path (`state.batch_rewards`).

Training batches follow a plan that depends only on (seed, epoch): shuffle, sort windows of `sort_window`
batches by length, cut into batches, shuffle the batches. A layout turns each batch's pair indices into a
Batch: `BucketedLayout` puts one pair in each group, one sequence per row, padded to the smallest of a few
bucket lengths that fits the batch (evaluation always uses it); `PackedLayout` lays sequences end to end in
rows of `data.pack_length` (or max_length) tokens (training with data.packing; no length sorting is needed
then). Either way XLA compiles few programs. The grain iterator's state (the next step) is saved with every
checkpoint.

Packing: bucketing alone cannot go below the padding of one sequence per row (chosen and rejected share one
width, and a pair's sides differ in length). A packed batch has positions and segments; group g holds pairs
g·B/G ... (g+1)·B/G - 1 of the batch. G is data x fsdp x grad_accum_steps, so each device's microbatch is whole
groups and the reward gather never crosses devices. R varies with the batch; it is rounded up to one of a few
row counts (chosen from the first epoch's batches) so XLA compiles few programs. A pair's reward is the same
packed or not: the mask and positions make each sequence see exactly what it would see alone
(tests/test_pipeline.py).
"""

from __future__ import annotations

import dataclasses

from flax import struct
import grain
import jax
import numpy as np

from jaxreward import graphs, hosts, sharding, tokenizer as tokenizer_lib
from jaxreward.configuration import ConfigError


def bucket_lengths(max_length: int, num_buckets: int) -> list[int]:
  return sorted({max(8, -(-max_length * k // num_buckets) // 8 * 8) for k in range(1, num_buckets + 1)} |
                {max_length})


def smallest_fitting(buckets, size: int) -> int:
  """The smallest of the sorted `buckets` that holds `size` (a padded length or a row count)."""
  return next(b for b in buckets if b >= size)


@struct.dataclass
class Batch:
  """This host's groups of a global batch (numpy on the host, jax arrays once on device).

  tokens_GxRxL    int32   G groups of R rows of L tokens: whole sequences back to back, then pad ids
  ends_GxBxP      int32   where each side's EOS (the token whose state is scored) lies: flat index r·L + l
  weight_GxB      float32 1 for a real pair, 0 for filler in the last evaluation batch
  margin_GxB      float32 the dataset's preference margin (0 when absent)
  positions_GxRxL int32   each token's position within its own sequence (RoPE restarts per sequence)
  segments_GxRxL  int32   1, 2, ... for the sequences of a row, 0 for padding (attention stays inside one)
  branches_GxRxL  int32   shared-prompt rows (GraphLayout): 0 for a prompt, k for the tokens of its k-th
                          response (a response sees its prompt and itself, never a sibling); None otherwise
  Positions and segments are None when every row holds one sequence from position 0 (BucketedLayout): no mask
  beyond the causal one is needed then, since padding only follows the EOS.
  """

  tokens_GxRxL: np.ndarray
  ends_GxBxP: np.ndarray
  weight_GxB: np.ndarray
  margin_GxB: np.ndarray
  positions_GxRxL: np.ndarray | None = None
  segments_GxRxL: np.ndarray | None = None
  branches_GxRxL: np.ndarray | None = None

  @staticmethod
  def sharding(mesh, rule_table):
    """Groups over the batch shards, every other axis replicated: one sharding for every field."""
    return sharding.batch_sharding(mesh, rule_table)

  def on_device(self, batch_sharding) -> Batch:
    """The global batch on the mesh, from this host's rows (`host_rows`, every field the same rows): each
    device takes the rows its shard covers, whichever hosts its data x fsdp x tensor group spans."""
    leading = hosts.global_leading(batch_sharding, jax.tree.leaves(self)[0].shape[0])
    rows_R = hosts.host_rows(batch_sharding, leading)

    def put(x):
      def shard(index):
        start, stop, _ = index[0].indices(leading)
        first = int(np.searchsorted(rows_R, start))  # A shard's rows are consecutive among this host's.
        return x[(slice(first, first + stop - start),) + tuple(index[1:])]
      return jax.make_array_from_callback((leading,) + x.shape[1:], batch_sharding, shard)

    return jax.tree.map(put, self)

  def real_tokens(self) -> int:
    if self.segments_GxRxL is not None:
      return int((self.segments_GxRxL > 0).sum())
    return int((self.ends_GxBxP % self.tokens_GxRxL.shape[-1] + 1).sum())  # One sequence per row.


def collate(enc: tokenizer_lib.Encoded, indices: np.ndarray, weight: np.ndarray, buckets: list[int], pad_id: int,
            rows=slice(None)) -> Batch:
  """One pair per group, one sequence per row (R = 2), padded to the smallest bucket that fits the whole batch;
  only the pairs `rows` (this host's: a slice or ascending indices) are laid out."""
  lengths_BxP = np.array([[len(enc.ids[i][0]), len(enc.ids[i][1])] for i in indices], np.int32).reshape(-1, 2)
  padded = smallest_fitting(buckets, lengths_BxP.max())
  indices, lengths_BxP, weight = indices[rows], lengths_BxP[rows], weight[rows]
  tokens_BxPxL = np.full((len(indices), 2, padded), pad_id, np.int32)
  for row, i in enumerate(indices):
    for p in range(2):
      tokens_BxPxL[row, p, :lengths_BxP[row, p]] = enc.ids[i][p]
  ends_Bx1xP = (np.arange(2, dtype=np.int32) * padded + lengths_BxP - 1)[:, None, :]
  return Batch(tokens_GxRxL=tokens_BxPxL, ends_GxBxP=ends_Bx1xP, weight_GxB=weight.astype(np.float32)[:, None],
               margin_GxB=enc.margin[indices][:, None])


class BucketedLayout:
  """Batches of one pair per group, each batch padded to the smallest bucket length that fits its longest
  sequence."""

  def __init__(self, buckets: list[int], pad_id: int):
    self.buckets, self.pad_id = buckets, pad_id

  def groups_of(self, batch_size: int) -> int:
    return batch_size

  def collate(self, enc: tokenizer_lib.Encoded, indices: np.ndarray, weight: np.ndarray, rows=slice(None)) -> Batch:
    return collate(enc, indices, weight, self.buckets, self.pad_id, rows)

  def computed_tokens(self, enc, indices) -> int:
    """Tokens the backbone computes for the batch, padding aside: every sequence in full."""
    # The batch's own lengths: enc.lengths() would measure every pair of the corpus once per batch.
    return sum(len(enc.ids[i][0]) + len(enc.ids[i][1]) for i in indices)

  def slots(self, enc: tokenizer_lib.Encoded, indices: np.ndarray) -> int:
    longest = max(max(len(enc.ids[i][0]), len(enc.ids[i][1])) for i in indices)
    return smallest_fitting(self.buckets, longest) * len(indices) * 2


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
  """Packs each group's sequences into rows (first fit decreasing); a batch's placement is computed once and
  shared by the row-bucket fit, the padding figures and the collation."""

  def __init__(self, row_length: int, groups: int, batch_size: int, pad_id: int):
    if batch_size % groups:
      raise ConfigError(f"config: train.batch_size={batch_size} does not split into {groups} packing groups "
                        "(data x fsdp x grad_accum_steps)")
    self.row_length, self.groups, self.pad_id = row_length, groups, pad_id
    # One row per sequence always suffices; the bucket set below starts as just that.
    self.row_buckets = [2 * batch_size // groups]
    self._placements = {}  # Pair indices (bytes) -> [(row_N, offset_N, rows)] per group.

  def groups_of(self, batch_size: int) -> int:
    return self.groups

  def placements(self, enc, indices) -> list:
    key = np.asarray(indices).tobytes()
    if key not in self._placements:
      # Chosen and rejected of each pair side by side: [G, 2·B/G] sequence lengths.
      lengths_GxN = np.array([[len(enc.ids[i][0]), len(enc.ids[i][1])] for i in indices],
                             np.int32).reshape(self.groups, -1)
      self._placements[key] = [first_fit_decreasing(lengths, self.row_length) for lengths in lengths_GxN]
    return self._placements[key]

  def rows_needed(self, enc, indices) -> int:
    return max(p[2] for p in self.placements(enc, indices))

  def fit_buckets(self, rows_per_batch, num_buckets: int) -> list[int]:
    """Row counts to round up to: quantiles of the observed counts, a little headroom for later epochs (whose
    batches differ), and the count that always suffices (one row per sequence)."""
    rows = np.asarray(rows_per_batch)
    quantiles = np.quantile(rows, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
    top, always = int(rows.max()), self.row_buckets[-1]
    self.row_buckets = sorted({int(q) for q in quantiles} | {min(top + max(1, top // 8), always), always})
    return self.row_buckets

  def padded_rows(self, rows: int) -> int:
    return smallest_fitting(self.row_buckets, rows)

  computed_tokens = BucketedLayout.computed_tokens

  def slots(self, enc, indices) -> int:
    """Token slots the batch occupies once packed (its real tokens plus padding)."""
    return self.groups * self.padded_rows(self.rows_needed(enc, indices)) * self.row_length

  def collate(self, enc, indices: np.ndarray, weight: np.ndarray, rows=slice(None)) -> Batch:
    """The batch's groups `rows` (this host's: a slice or ascending indices); the row count comes from every
    group, so all hosts agree."""
    width, placements = self.row_length, self.placements(enc, indices)
    num_rows = self.padded_rows(max(p[2] for p in placements))
    pairs_per_group = len(indices) // self.groups
    mine = np.arange(self.groups)[rows]
    tokens = np.full((len(mine), num_rows, width), self.pad_id, np.int32)
    positions = np.zeros((len(mine), num_rows, width), np.int32)
    segments = np.zeros((len(mine), num_rows, width), np.int32)
    ends = np.zeros((len(mine), pairs_per_group, 2), np.int32)
    for slot, g in enumerate(mine):
      row_N, offset_N, _ = placements[g]
      segments_in_row = np.zeros(num_rows, np.int32)
      for n, (row, offset) in enumerate(zip(row_N, offset_N)):
        pair, side = divmod(n, 2)
        ids = enc.ids[indices[g * pairs_per_group + pair]][side]
        span = slice(offset, offset + len(ids))
        segments_in_row[row] += 1
        tokens[slot, row, span] = ids
        positions[slot, row, span] = np.arange(len(ids))
        segments[slot, row, span] = segments_in_row[row]
        ends[slot, pair, side] = row * width + offset + len(ids) - 1
    return Batch(tokens_GxRxL=tokens, ends_GxBxP=ends,
                 weight_GxB=weight.astype(np.float32).reshape(self.groups, -1)[rows],
                 margin_GxB=enc.margin[indices].reshape(self.groups, -1)[rows], positions_GxRxL=positions,
                 segments_GxRxL=segments)


class GraphLayout(PackedLayout):
  """PackedLayout whose units are prompt trees (graphs.py) instead of single sequences: each prompt of a group
  once, each of its distinct responses once; the row buckets, padding figures and host split are the same."""

  def placements(self, enc, indices) -> list:
    key = np.asarray(indices).tobytes()
    if key not in self._placements:
      per_group = len(indices) // self.groups
      self._placements[key] = []
      for g in range(self.groups):
        trees, sides = graphs.trees_of(enc, indices[g * per_group:(g + 1) * per_group], self.row_length)
        row_T, offset_T, rows = first_fit_decreasing(np.array([len(t) for t in trees]), self.row_length)
        self._placements[key].append((row_T, offset_T, rows, trees, sides))
    return self._placements[key]

  def computed_tokens(self, enc, indices) -> int:
    return sum(len(t) for p in self.placements(enc, indices) for t in p[3])

  def collate(self, enc, indices: np.ndarray, weight: np.ndarray, rows=slice(None)) -> Batch:
    placements = self.placements(enc, indices)
    num_rows = self.padded_rows(max(p[2] for p in placements))
    mine = np.arange(self.groups)[rows]
    shape = (len(mine), num_rows, self.row_length)
    tokens = np.full(shape, self.pad_id, np.int32)
    positions, segments, branches = (np.zeros(shape, np.int32) for _ in range(3))
    ends = np.zeros((len(mine), len(indices) // self.groups, 2), np.int32)
    for slot, g in enumerate(mine):
      row_T, offset_T, _, trees, sides = placements[g]
      eos_of = graphs.write_trees(trees, row_T, offset_T, self.row_length, tokens[slot], positions[slot],
                                  segments[slot], branches[slot])
      ends[slot] = np.array([eos_of[s] for s in sides], np.int32).reshape(-1, 2)
    return Batch(tokens_GxRxL=tokens, ends_GxBxP=ends,
                 weight_GxB=weight.astype(np.float32).reshape(self.groups, -1)[rows],
                 margin_GxB=enc.margin[indices].reshape(self.groups, -1)[rows], positions_GxRxL=positions,
                 segments_GxRxL=segments, branches_GxRxL=branches)


class TrainPlan:
  """Which pairs form global batch `step`; a pure function of (seed, step)."""

  def __init__(self, enc: tokenizer_lib.Encoded, batch_size: int, sort_window: int, seed: int,
               group_by_prompt: bool = False):
    if len(enc) < batch_size:
      raise ConfigError(f"data: only {len(enc)} training pairs for a batch of {batch_size} (train.batch_size)")
    self.enc, self.batch_size, self.sort_window, self.seed = enc, batch_size, sort_window, seed
    self.group_by_prompt = group_by_prompt
    self.pair_lengths = enc.lengths().max(axis=1)
    self.batches_per_epoch = len(enc) // batch_size
    self._cached_epoch, self._cached_plan = -1, None

  def epoch(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, batch_size] pair indices of one epoch."""
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      if self.group_by_prompt:  # A prompt's pairs side by side, so that most land in one batch.
        order = graphs.grouped_order(self.enc.prompt_group, rng)[:self.batches_per_epoch * self.batch_size]
      else:
        order = rng.permutation(len(self.enc))[:self.batches_per_epoch * self.batch_size]
      window = self.batch_size * self.sort_window
      # Prompt groups are not length-sorted: that would scatter a prompt's pairs over a batch's groups.
      for start in range(0, 0 if self.group_by_prompt else len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(self.pair_lengths[chunk], kind="stable")]
      batches = order.reshape(self.batches_per_epoch, self.batch_size)
      self._cached_plan, self._cached_epoch = batches[rng.permutation(self.batches_per_epoch)], epoch
    return self._cached_plan

  def indices(self, step: int) -> np.ndarray:
    return self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

  def padding_fraction(self, epoch: int, layout) -> float:
    """Share of the epoch's token slots that are padding under `layout`."""
    real = padded = 0
    for idx in self.epoch(epoch):
      real += layout.computed_tokens(self.enc, idx)
      padded += layout.slots(self.enc, idx)
    return 1.0 - real / padded


def make_plan(config, enc: tokenizer_lib.Encoded) -> TrainPlan:
  # Packed batches are drawn unsorted: any mix of lengths packs well, while length-sorted batches vary so much
  # in row count that they need many more row buckets (ETHICS: 16-20% padding instead of 4%).
  d, t = config.data, config.train
  return TrainPlan(enc, t.batch_size, 1 if d.packing or d.group_by_prompt else d.sort_window, t.seed,
                   d.group_by_prompt)


def make_layout(config, plan, batch_shards: int, pad_id: int):
  """(layout, description) of training batches: packed rows or length buckets."""
  d, t = config.data, config.train
  if d.packing or d.group_by_prompt:
    kind = GraphLayout if d.group_by_prompt else PackedLayout
    layout = kind(d.pack_length or d.max_length, batch_shards * t.grad_accum_steps, t.batch_size, pad_id)
    layout.fit_buckets([layout.rows_needed(plan.enc, idx) for idx in plan.epoch(0)], d.num_buckets)
    what = "prompt trees" if d.group_by_prompt else "packed"
    return layout, f"{what} in {layout.groups} group(s) of {layout.row_buckets} rows x {layout.row_length}"
  buckets = bucket_lengths(d.max_length, d.num_buckets)
  return BucketedLayout(buckets, pad_id), f"buckets {buckets}"


def train_dataset(plan: TrainPlan, num_steps: int, layout, batch_sharding=None):
  """A grain IterDataset of this host's rows (`host_rows`) of batches 0..num_steps-1; resumable via
  get/set_state."""

  def make_batch(step):
    indices = plan.indices(int(step))
    # Each host lays out only its devices' groups; shapes come from the whole batch, so every host's agree.
    rows = hosts.host_rows(batch_sharding, layout.groups_of(len(indices)))
    return layout.collate(plan.enc, indices, np.ones(len(indices)), rows)

  return grain.MapDataset.range(num_steps).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


@dataclasses.dataclass
class EvalBatches:
  """Fixed evaluation batches, and for each real pair in batch order its position in the indices asked for."""
  batches: list[Batch]
  positions: np.ndarray


def eval_batches(enc: tokenizer_lib.Encoded, indices: np.ndarray, batch_size: int, buckets, pad_id: int,
                 batch_sharding=None) -> EvalBatches:
  """Batches of the pairs `indices`, sorted by length (this host's rows of each); the last is filled with
  weight-0 copies."""
  rows = hosts.host_rows(batch_sharding, batch_size)
  lengths = enc.lengths().max(axis=1)
  positions = np.argsort(lengths[indices], kind="stable")
  ordered = indices[positions]
  batches = []
  for start in range(0, len(ordered), batch_size):
    chunk = ordered[start:start + batch_size]
    weight = np.ones(batch_size)
    if len(chunk) < batch_size:
      weight[len(chunk):] = 0.0
      chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
    batches.append(collate(enc, chunk, weight, buckets, pad_id, rows))
  return EvalBatches(batches, positions)
