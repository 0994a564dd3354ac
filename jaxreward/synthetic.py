"""The embedded default task: preference pairs generated offline and deterministically from a seed.

Three kinds of request, each answered correctly (chosen) and subtly wrongly (rejected). Both answers
have the same length and, for two kinds, the very same words, so no single token or length gives the
preference away: the model has to read the content and relate the answer to the prompt.
- sort:    "Sort ascending: 42 7 19"          chosen "7 19 42"        rejected: two neighbours swapped
- compare: "Which is larger, 42 or 17?"       chosen "42 is larger."  rejected "17 is larger."
- repeat:  "Repeat exactly: red fox river"    chosen the same words   rejected: one word replaced
"""

from __future__ import annotations

import numpy as np

from jaxreward.data import Pair

WORDS = ("apple river stone cloud maple tiger honey lemon piano rocket forest silver candle garden window "
         "violet copper desert island marble orange pepper rabbit saddle thunder velvet walnut yellow zebra "
         "anchor basket castle dragon engine falcon glacier harbor jungle kettle lantern meadow").split()
KINDS = ("sort", "compare", "repeat")


def _sort(rng) -> tuple[str, str, str]:
  n = int(rng.integers(3, 7))
  values = [int(v) for v in rng.choice(100, size=n, replace=False)]
  ordered = sorted(values)
  wrong = list(ordered)
  i = int(rng.integers(0, n - 1))
  wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
  text = lambda xs: " ".join(map(str, xs))
  return f"Sort ascending: {text(values)}", text(ordered), text(wrong)


def _compare(rng) -> tuple[str, str, str]:
  a, b = (int(v) for v in rng.choice(100, size=2, replace=False))
  big, small = max(a, b), min(a, b)
  return f"Which is larger, {a} or {b}?", f"{big} is larger.", f"{small} is larger."


def _repeat(rng) -> tuple[str, str, str]:
  n = int(rng.integers(3, 6))
  words = [str(w) for w in rng.choice(WORDS, size=n, replace=False)]
  wrong = list(words)
  wrong[int(rng.integers(0, n))] = str(rng.choice([w for w in WORDS if w not in words]))
  return f"Repeat exactly: {' '.join(words)}", " ".join(words), " ".join(wrong)


def generate(num_pairs: int, seed: int) -> list[Pair]:
  """`num_pairs` distinct pairs, kinds interleaved; identical for identical arguments."""
  rng = np.random.default_rng(seed)
  makers = {"sort": _sort, "compare": _compare, "repeat": _repeat}
  pairs, seen = [], set()
  while len(pairs) < num_pairs:
    kind = KINDS[len(pairs) % len(KINDS)]
    prompt, chosen, rejected = makers[kind](rng)
    if prompt in seen:
      continue
    seen.add(prompt)
    pairs.append(Pair(prompt=prompt + "\n", chosen=chosen, rejected=rejected, extra={"category": kind},
                      where=f"synthetic:{len(pairs) + 1}"))
  return pairs
