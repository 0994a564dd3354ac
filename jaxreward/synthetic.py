"""The embedded default task: preference pairs generated offline and deterministically from a seed.

Three kinds of request, each answered correctly (chosen) and wrongly (rejected). Both answers have the
same length and shape, and every answer word is chosen under some prompts and rejected under others, so
no single token or length gives the preference away: the model has to relate the answer to the prompt.
- compare:  "Which is larger, 42 or 17?"        chosen "42 is larger."    rejected "17 is larger."
- maximum:  "Which is the largest of 5 61 23?"  chosen "61."              rejected another number of the list
- category: "Name a fruit."                     chosen "I would say lemon." rejected the same with a non-fruit
Prompts end in "Answer:" and responses start with a space, so a word is the same token in both.

`generate_ranked` asks each prompt for K responses as ranked lines (data.parse_ranked): maximum ranks K numbers
of its list by value, category one right member above K-1 tied wrong ones, compare its two answers.
"""

from __future__ import annotations

import numpy as np

from jaxreward import pipeline, tokenizer
from jaxreward.data import Pair, parse_ranked

CATEGORIES = {
    "fruit": "apple lemon mango cherry peach plum grape melon".split(),
    "animal": "tiger rabbit falcon zebra horse otter camel eagle".split(),
    "color": "violet yellow orange silver purple green scarlet indigo".split(),
    "tool": "hammer wrench chisel shovel pliers saw drill ladder".split(),
    "city": "paris london madrid tokyo cairo lima oslo berlin".split(),
    "instrument": "piano violin flute guitar trumpet harp drum cello".split(),
}
KINDS = ("compare", "maximum", "category")


def _compare(rng) -> tuple[str, str, str]:
  a, b = (int(v) for v in rng.choice(100, size=2, replace=False))
  big, small = max(a, b), min(a, b)
  return f"Which is larger, {a} or {b}?", f" {big} is larger.", f" {small} is larger."


def _maximum(rng) -> tuple[str, str, str]:
  values = [int(v) for v in rng.choice(100, size=int(rng.integers(3, 6)), replace=False)]
  wrong = int(rng.choice(sorted(values)[:-1]))
  return f"Which is the largest of {' '.join(map(str, values))}?", f" {max(values)}.", f" {wrong}."


def _category(rng) -> tuple[str, str, str]:
  names = sorted(CATEGORIES)
  right, other = (str(c) for c in rng.choice(names, size=2, replace=False))
  template = str(rng.choice(["Name {}.", "Give me {}.", "Tell me {}, please.", "What is an example of {}?"]))
  article = "an" if right[0] in "aeiou" else "a"
  good, bad = str(rng.choice(CATEGORIES[right])), str(rng.choice(CATEGORIES[other]))
  lead = str(rng.choice(["I would say", "How about", "My answer is", "Try"]))
  return template.format(f"{article} {right}"), f" {lead} {good}.", f" {lead} {bad}."


def generate(num_pairs: int, seed: int) -> list[Pair]:
  """`num_pairs` distinct pairs, kinds interleaved; identical for identical arguments."""
  rng = np.random.default_rng(seed)
  makers = {"compare": _compare, "maximum": _maximum, "category": _category}
  pairs, seen = [], set()
  while len(pairs) < num_pairs:
    kind = KINDS[len(pairs) % len(KINDS)]
    prompt, chosen, rejected = makers[kind](rng)
    if (prompt, chosen, rejected) in seen:
      continue
    seen.add((prompt, chosen, rejected))
    pairs.append(Pair(prompt=prompt + "\nAnswer:", chosen=chosen, rejected=rejected, extra={"category": kind},
                      where=f"synthetic:{len(pairs) + 1}"))
  return pairs


def packed_batch(length: int, rows: int, vocab: int, seed: int = 0, median: float = 0.0) -> tuple[pipeline.Batch, int]:
  """A packed batch of random token ids for benchmarks (tools/long_context.py, tools/train_bench.py): as many
  pairs (lognormal lengths, median `median` or length / 12) as fill `rows` rows; also returns the real tokens."""
  rng = np.random.default_rng(seed)
  lengths = []
  while True:
    pair = np.clip(rng.lognormal(np.log(median or length / 12), 0.7, size=2), 8, length).astype(int)
    if pipeline.first_fit_decreasing(np.concatenate(lengths + [pair]), length)[2] > rows:
      break
    lengths.append(pair)
  ids = [[rng.integers(2, vocab, size=int(n)).astype(np.int32) for n in pair] for pair in lengths]
  enc = tokenizer.Encoded(ids=ids, margin=np.zeros(len(ids), np.float32), pairs=[None] * len(ids))
  layout = pipeline.PackedLayout(length, 1, len(ids), pad_id=0)
  layout.row_buckets = [rows]
  return layout.collate(enc, np.arange(len(ids)), np.ones(len(ids))), int(np.sum(lengths))


def _ranked_maximum(rng, k: int) -> dict:
  values = [int(v) for v in rng.choice(100, size=int(rng.integers(k, k + 3)), replace=False)]
  shown = [int(v) for v in rng.choice(values, size=k, replace=False)]
  if max(values) not in shown:
    shown[0] = max(values)
  return {"prompt": f"Which is the largest of {' '.join(map(str, values))}?", "responses": [f" {v}." for v in shown],
          "scores": shown}


def _ranked_category(rng, k: int) -> dict:
  prompt, right, wrong = _category(rng)
  lead, good = right.rsplit(" ", 1)
  names = [n for n in CATEGORIES if good.rstrip(".") not in CATEGORIES[n]]
  others = {str(rng.choice(CATEGORIES[str(c)])) for c in rng.choice(names, size=k - 1, replace=False)}
  responses = [right] + [f"{lead} {w}." for w in sorted(others)]
  return {"prompt": prompt, "responses": responses, "scores": [1] + [0] * (len(responses) - 1)}


def _ranked_compare(rng, k: int) -> dict:
  del k  # Two numbers have two answers.
  prompt, chosen, rejected = _compare(rng)
  return {"prompt": prompt, "responses": [chosen, rejected], "scores": [1, 0]}


def ranked_rows(responses: int, seed: int):
  """Endless distinct ranked lines (data.parse_ranked's format) of up to `responses` answers per prompt."""
  rng = np.random.default_rng(seed)
  makers = {"compare": _ranked_compare, "maximum": _ranked_maximum, "category": _ranked_category}
  seen, lines = set(), 0
  while True:
    kind = KINDS[lines % len(KINDS)]
    row = makers[kind](rng, responses)
    key = (row["prompt"], tuple(row["responses"]))
    if key in seen:
      continue
    seen.add(key)
    lines += 1
    yield dict(row, prompt=row["prompt"] + "\nAnswer:", category=kind)


def generate_ranked(num_pairs: int, responses: int, seed: int) -> list[Pair]:
  """The pairs of `ranked_rows`' lines, until there are `num_pairs` of them."""
  pairs = []
  for line, row in enumerate(ranked_rows(responses, seed), 1):
    for pair in parse_ranked(row)[0][:num_pairs - len(pairs)]:
      pair.where = f"synthetic:{line}"
      pairs.append(pair)
    if len(pairs) == num_pairs:
      return pairs
