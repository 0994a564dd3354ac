"""Pairs -> token ids -> length-bucketed batches, streamed through grain with exact resume.

A batch is a dict of numpy arrays holding this host's rows of the global batch:
  tokens_BxPxL int32   chosen (p=0) and rejected (p=1), right-padded with the pad id
  lengths_BxP  int32   real tokens per sequence; the reward is read at lengths-1 (the EOS)
  weight_B     float32 1 for a real pair, 0 for filler in the last evaluation batch
  margin_B     float32 the dataset's preference margin (0 when absent)

Training batches follow a plan that depends only on (seed, epoch): shuffle, sort windows of
`sort_window` batches by length, cut into batches, shuffle the batches. A layout turns each batch's pair
indices into arrays: `BucketedLayout` pads it to the smallest of a few bucket lengths that fits it (the
layout above; evaluation always uses it), `packing.PackedLayout` packs its sequences into rows (training
with data.packing; no length sorting is needed then). Either way XLA compiles few programs. The grain
iterator's state (the next step) is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import grain
import numpy as np

from jaxreward.configuration import ConfigError
from jaxreward.data import Pair

# The plain template, for conversations when the tokenizer has no chat template (e.g. our own BPE):
#   prompt   = "<|user|>\nHi\n" ... (every prompt message as PLAIN_TEMPLATE) + "<|assistant|>\n"
#   response = "Hello\n" (+ "<|assistant|>\nmore\n" for each further response message)
# so prompt + response is exactly the PLAIN_TEMPLATE rendering of the whole conversation; EOS follows.
PLAIN_TEMPLATE = "<|{role}|>\n{content}\n"
# The same as a Jinja chat template, for exported tokenizers (export.py): `apply_chat_template` then renders
# what training rendered.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
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
  """Token ids of both sides of every pair: `sequence(tokens of prompt + response)`.

  The scored text (prompt and response joined with nothing between, or a chat template's rendering) is
  tokenized as ONE string, as `tokenizer(prompt + response)` does in transformers: tokenizing the two parts
  apart can split differently where they meet, and an exported tokenizer could not reproduce that.
  """
  eos = tok.eos_token_id
  out = Encoded(ids=[], margin=np.zeros(0, np.float32), pairs=[])
  margins = []
  leading = leading_special_ids(tok)
  if max_length < len(leading) + 2:
    raise ConfigError(f"config: data.max_length={max_length} leaves no room for text between the tokenizer's "
                      f"{len(leading)} leading special tokens and EOS")
  texts = ["".join(render(pair.prompt, response, tok)) for pair in pairs for response in (pair.chosen, pair.rejected)]
  # verbose=False: no "longer than the maximum" warning; sequence() cuts.
  bodies = tok(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
  for i, pair in enumerate(pairs):
    (chosen, cut_c), (rejected, cut_r) = (sequence(bodies[2 * i + s], leading, eos, max_length) for s in (0, 1))
    if (cut_c or cut_r) and truncation == "drop":
      out.dropped += 1
      continue
    out.truncated += cut_c or cut_r
    out.ids.append([chosen, rejected])
    out.pairs.append(pair)
    margins.append(pair.margin)
  out.margin = np.asarray(margins, np.float32)
  return out


def sequence(body: list[int], leading: list[int], eos: int, max_length: int) -> tuple[np.ndarray, bool]:
  """(leading specials + body + EOS, whether body was cut): each special exactly once, the body cut from the left.

  This is the encoding an exported tokenizer's post-processor reproduces (export.py): leading specials (e.g.
  BOS; a chat template that writes them itself does not get a second copy), then the text, then one EOS (a
  text already ending in EOS does not get a second one), and a text too long for `max_length` loses its
  beginning, never the leading specials, its end or the EOS where the reward is read.
  """
  body = list(body)
  if leading and body[:len(leading)] == leading:
    body = body[len(leading):]
  if body and body[-1] == eos:
    body = body[:-1]
  room = max_length - len(leading) - 1
  cut = len(body) > room
  return np.asarray(leading + body[len(body) - room if cut else 0:] + [eos], np.int32), cut


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


def collate(enc: Encoded, indices: np.ndarray, weight: np.ndarray, buckets: list[int], pad_id: int) -> dict:
  lengths_BxP = np.zeros((len(indices), 2), np.int32)
  for row, i in enumerate(indices):
    lengths_BxP[row] = [len(enc.ids[i][0]), len(enc.ids[i][1])]
  padded = smallest_fitting(buckets, lengths_BxP.max())
  tokens_BxPxL = np.full((len(indices), 2, padded), pad_id, np.int32)
  for row, i in enumerate(indices):
    for p in range(2):
      tokens_BxPxL[row, p, :lengths_BxP[row, p]] = enc.ids[i][p]
  return {"tokens_BxPxL": tokens_BxPxL, "lengths_BxP": lengths_BxP, "weight_B": weight.astype(np.float32),
          "margin_B": enc.margin[indices]}


class BucketedLayout:
  """The B x P x L layout: each batch padded to the smallest bucket length that fits its longest sequence."""

  def __init__(self, buckets: list[int], pad_id: int):
    self.buckets, self.pad_id = buckets, pad_id

  def collate(self, enc: Encoded, indices: np.ndarray, weight: np.ndarray) -> dict:
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
    rows = host_rows(next(iter(batch.values())).shape[0], process_index, process_count)
    return {k: v[rows] for k, v in batch.items()}

  return grain.MapDataset.range(num_steps).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(enc: Encoded, indices: np.ndarray, batch_size: int, buckets, pad_id: int, process_index: int,
                 process_count: int) -> list[dict]:
  """Fixed evaluation batches, sorted by length; the last is filled with weight-0 copies."""
  rows = host_rows(batch_size, process_index, process_count)
  lengths = enc.lengths().max(axis=1)
  ordered = indices[np.argsort(lengths[indices], kind="stable")]
  batches = []
  for start in range(0, len(ordered), batch_size):
    chunk = ordered[start:start + batch_size]
    weight = np.ones(batch_size)
    if len(chunk) < batch_size:
      weight[len(chunk):] = 0.0
      chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
    batch = collate(enc, chunk, weight, buckets, pad_id)
    batches.append({k: v[rows] for k, v in batch.items()})
  return batches
