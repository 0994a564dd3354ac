"""Pairs -> token ids -> batches, streamed through grain with exact resume.

Every batch, packed or not, is one `Batch` (below): G groups of R rows of L tokens that hold the sequences of
the group's B/G pairs, plus where each side's EOS lies. The model reads it through one entry point
(`RewardModel.score`), the loss through one path (`state.batch_rewards`).

Training batches follow a plan that depends only on (seed, epoch): shuffle, sort windows of
`sort_window` batches by length, cut into batches, shuffle the batches. A layout turns each batch's pair
indices into a Batch: `BucketedLayout` puts one pair in each group, one sequence per row, padded to the
smallest of a few bucket lengths that fits the batch (evaluation always uses it); `packing.PackedLayout`
packs sequences into rows (training with data.packing; no length sorting is needed then). Either way XLA
compiles few programs. The grain iterator's state (the next step) is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
from flax import struct
import grain
import jax
import numpy as np

from jaxreward import sharding
from jaxreward.configuration import ConfigError
from jaxreward.data import Pair

# The plain template, for conversations when the tokenizer has no chat template (e.g. our own BPE):
#   prompt   = "<|user|>\nHi\n" ... (every prompt message as PLAIN_TEMPLATE) + "<|assistant|>\n"
#   response = "Hello\n" (+ "<|assistant|>\nmore\n" for each further response message)
# so prompt + response is exactly the PLAIN_TEMPLATE rendering of the whole conversation; EOS follows.
PLAIN_TEMPLATE = "<|{role}|>\n{content}\n"
_warned_templates = set()


def _chat(tok, messages, **kwargs) -> str:
  try:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)
  except Exception as e:  # Jinja templates raise anything (TemplateError, TypeError) on roles they reject.
    first = str(messages[0].get("content", ""))[:40] if messages else ""
    raise ConfigError(f"tokenizer: the chat template cannot render the conversation starting {first!r} "
                      f"({type(e).__name__}: {e}); fix the roles or set data.tokenizer to one whose template "
                      "accepts them") from None


def render(pair_side_prompt, response, tok) -> tuple[str, str]:
  """(prompt text, response text) of one side; prompt + response is the text that is scored.

  Text pairs are used as they are (no separator is added). Conversations go through the tokenizer's chat
  template when it has one, else through PLAIN_TEMPLATE (above). The prompt is the template's rendering
  with the generation prompt; the response is what the whole conversation's rendering adds to it. Templates
  whose whole rendering does not extend that prefix (some add a generation prompt the conversation does not
  contain, e.g. an empty "<think>" block) fall back to the longest shared prefix: the scored text is still the
  template's exact rendering, only the prompt/response boundary moves, and that boundary only decides what
  keep_end truncation cuts first. A template that drops the response text is an error, not a silent pair.
  """
  if isinstance(pair_side_prompt, str):
    return pair_side_prompt, response
  if getattr(tok, "chat_template", None):
    prompt_text = _chat(tok, pair_side_prompt, add_generation_prompt=True)
    full = _chat(tok, pair_side_prompt + response)
    if not full.startswith(prompt_text):
      bare = _chat(tok, pair_side_prompt)
      if full.startswith(bare):
        prompt_text = bare
      else:
        prompt_text = full[:len(os.path.commonprefix([prompt_text, full]))]
        key = getattr(tok, "name_or_path", "") or str(hash(tok.chat_template))
        if key not in _warned_templates:
          _warned_templates.add(key)
          logging.warning("chat template of %r: the conversation's rendering does not start with the prompt's "
                          "rendering; splitting prompt and response at their longest shared prefix", key)
    body = full[len(prompt_text):]
    # The tail of each message must survive (some templates rewrite a reasoning head, none the answer's end).
    missing = [m["content"] for m in response if m["content"].strip()[-32:] not in body]
    if missing:
      raise ConfigError(f"tokenizer: the chat template drops the response text {missing[0][:40]!r} (after the "
                        f"prompt it renders only {body[:60]!r}); use a tokenizer whose template renders the last "
                        "assistant turn")
    return prompt_text, body
  prompt_text = "".join(PLAIN_TEMPLATE.format(**m) for m in pair_side_prompt) + "<|assistant|>\n"
  body = "".join(PLAIN_TEMPLATE.format(**m) for m in response)
  return prompt_text, body[len("<|assistant|>\n"):]


def texts_for_tokenizer(pairs: list[Pair]):
  for p in pairs:
    for response in (p.chosen, p.rejected):
      prompt, body = render(p.prompt, response, None)
      yield prompt + body


@dataclasses.dataclass
class Encoded:
  ids: list  # [pair][side] -> np.int32 array, EOS last.
  margin: np.ndarray  # [pair] float32
  pairs: list  # The Pair records kept, aligned with ids.
  truncated: int = 0  # Pairs with at least one side cut to max_length.
  dropped: int = 0  # Pairs skipped under truncation="drop".

  def __len__(self):
    return len(self.ids)

  def lengths(self) -> np.ndarray:
    return np.array([[len(a), len(b)] for a, b in self.ids], dtype=np.int32).reshape(-1, 2)


def encode(pairs: list[Pair], tok, max_length: int, truncation: str) -> Encoded:
  eos = tok.eos_token_id
  out = Encoded(ids=[], margin=np.zeros(0, np.float32), pairs=[])
  margins = []
  prompt_cache = {}
  leading = leading_special_ids(tok)
  for pair in pairs:
    sides, cut = [], False
    for response in (pair.chosen, pair.rejected):
      prompt_text, response_text = render(pair.prompt, response, tok)
      if prompt_text not in prompt_cache:
        # A chat template writes its own BOS; plain text gets the tokenizer's leading specials (e.g. BOS) but
        # never its trailing ones (EOS/SEP), which would land mid-sequence.
        from_template = not isinstance(pair.prompt, str)
        prompt_cache[prompt_text] = ([] if from_template else leading) + (
            tok(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else [])
      ids = prompt_cache[prompt_text] + tok(response_text, add_special_tokens=False)["input_ids"] + [eos]
      if len(ids) > max_length:
        cut = True
        # Keep the end: the prompt's beginning goes first, a response's end never does.
        ids = ids[-max_length:]
      sides.append(np.asarray(ids, np.int32))
    if cut and truncation == "drop":
      out.dropped += 1
      continue
    out.truncated += cut
    out.ids.append(sides)
    out.pairs.append(pair)
    margins.append(pair.margin)
  out.margin = np.asarray(margins, np.float32)
  return out


def leading_special_ids(tok) -> list[int]:
  """The special tokens the tokenizer puts before any text (BOS for Llama-style tokenizers, none for GPT-2)."""
  plain = tok("x", add_special_tokens=False)["input_ids"]
  full = tok("x", add_special_tokens=True)["input_ids"]
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return full[:start]
  return []


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
  The last two are None when every row holds one sequence from position 0 (BucketedLayout): no mask beyond
  the causal one is needed then, since padding only follows the EOS.
  """

  tokens_GxRxL: np.ndarray
  ends_GxBxP: np.ndarray
  weight_GxB: np.ndarray
  margin_GxB: np.ndarray
  positions_GxRxL: np.ndarray | None = None
  segments_GxRxL: np.ndarray | None = None

  @staticmethod
  def sharding(mesh, rule_table):
    """Groups over the batch shards, every other axis replicated: one sharding for every field."""
    return sharding.batch_sharding(mesh, rule_table)

  def groups(self, rows: slice) -> Batch:
    return jax.tree.map(lambda x: x[rows], self)

  def on_device(self, batch_sharding) -> Batch:
    """Each host contributes its groups; together they form the global batch."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), self)

  def real_tokens(self) -> int:
    if self.segments_GxRxL is not None:
      return int((self.segments_GxRxL > 0).sum())
    return int((self.ends_GxBxP % self.tokens_GxRxL.shape[-1] + 1).sum())  # One sequence per row.


def collate(enc: Encoded, indices: np.ndarray, weight: np.ndarray, buckets: list[int], pad_id: int) -> Batch:
  """One pair per group, one sequence per row (R = 2), padded to the smallest bucket that fits the batch."""
  lengths_BxP = np.zeros((len(indices), 2), np.int32)
  for row, i in enumerate(indices):
    lengths_BxP[row] = [len(enc.ids[i][0]), len(enc.ids[i][1])]
  padded = smallest_fitting(buckets, lengths_BxP.max())
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

  def collate(self, enc: Encoded, indices: np.ndarray, weight: np.ndarray) -> Batch:
    return collate(enc, indices, weight, self.buckets, self.pad_id)

  def slots(self, enc: Encoded, indices: np.ndarray) -> int:
    longest = max(max(len(enc.ids[i][0]), len(enc.ids[i][1])) for i in indices)
    return smallest_fitting(self.buckets, longest) * len(indices) * 2


class TrainPlan:
  """Which pairs form global batch `step`; a pure function of (seed, step)."""

  def __init__(self, enc: Encoded, batch_size: int, sort_window: int, seed: int):
    if len(enc) < batch_size:
      raise ConfigError(f"data: only {len(enc)} training pairs for a batch of {batch_size} (train.batch_size)")
    self.enc, self.batch_size, self.sort_window, self.seed = enc, batch_size, sort_window, seed
    self.pair_lengths = enc.lengths().max(axis=1)
    self.batches_per_epoch = len(enc) // batch_size
    self._cached_epoch, self._cached_plan = -1, None

  def epoch(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, batch_size] pair indices of one epoch."""
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(len(self.enc))[:self.batches_per_epoch * self.batch_size]
      window = self.batch_size * self.sort_window
      for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(self.pair_lengths[chunk], kind="stable")]
      batches = order.reshape(self.batches_per_epoch, self.batch_size)
      self._cached_plan, self._cached_epoch = batches[rng.permutation(self.batches_per_epoch)], epoch
    return self._cached_plan

  def indices(self, step: int) -> np.ndarray:
    return self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

  def padding_fraction(self, epoch: int, layout) -> float:
    """Share of the epoch's token slots that are padding under `layout`."""
    lengths = self.enc.lengths()
    real = padded = 0
    for idx in self.epoch(epoch):
      real += int(lengths[idx].sum())
      padded += layout.slots(self.enc, idx)
    return 1.0 - real / padded


def host_rows(leading: int, process_index: int, process_count: int, what: str = "train.batch_size") -> slice:
  """This host's share of a global batch's leading axis (pairs, or packing groups)."""
  if leading % process_count:
    raise ConfigError(f"config: {what}={leading} does not split over {process_count} processes")
  per = leading // process_count
  return slice(process_index * per, (process_index + 1) * per)


def train_dataset(plan: TrainPlan, num_steps: int, layout, process_index: int, process_count: int):
  """A grain IterDataset of this host's rows of batches 0..num_steps-1; resumable via get/set_state."""

  def make_batch(step):
    indices = plan.indices(int(step))
    # Shapes (padded width, packed rows) come from the whole global batch so every host builds the same.
    batch = layout.collate(plan.enc, indices, np.ones(len(indices)))
    return batch.groups(host_rows(batch.tokens_GxRxL.shape[0], process_index, process_count))

  return grain.MapDataset.range(num_steps).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


@dataclasses.dataclass
class EvalBatches:
  """Fixed evaluation batches, and for each real pair in batch order its position in the indices asked for."""
  batches: list[Batch]
  positions: np.ndarray


def eval_batches(enc: Encoded, indices: np.ndarray, batch_size: int, buckets, pad_id: int, process_index: int,
                 process_count: int) -> EvalBatches:
  """Batches of the pairs `indices`, sorted by length; the last is filled with weight-0 copies."""
  rows = host_rows(batch_size, process_index, process_count)
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
    batches.append(collate(enc, chunk, weight, buckets, pad_id).groups(rows))
  return EvalBatches(batches, positions)
