"""Comparison graphs: each prompt computed once, each distinct response once, every pair of the prompt an edge.

With `data.group_by_prompt` the training plan keeps the pairs of one prompt together (`grouped_order`), and
`pipeline.GraphLayout` lays each packing group's pairs out as prompt trees instead of one sequence per side:

  row:       [ prompt (shared) | response 1 | response 2 | ... ] [ next tree ... ] [ padding ]
  positions:   0 .. p-1          p ..         p ..                0 ..
  branches:    0                 1            2                   0   1 ...
  segments:    1 for the whole tree, 2 for the next, ..., 0 for padding

A response token sees the tree's prompt and the earlier tokens of its own response, never a sibling
(attention.attend with `branches`), and each response's positions continue from the prompt's end, so every
response's EOS state is exactly the one of its sequence scored alone. The shared part is the longest common
prefix of the token ids of the tree's full sequences (`tokenizer.encode` ids, unchanged): BPE merges across
the prompt/response boundary, truncation and chat templates can make "the prompt's ids" differ per response,
and the common prefix of the real ids is what is truly identical (it may reach into the responses when they
start alike). A prompt whose distinct responses do not fit one row is split into several trees.

The edges are the pairs themselves: the batch keeps one (chosen, rejected) EOS per pair in `ends_GxBxP`, so the
loss, the metrics (pairwise accuracy) and evaluation are those of the pair path; only what the backbone
computes changes. A response shared by several pairs (PandaLM: 685 distinct responses in 894 pairs) is one slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Tree:
  shared: np.ndarray  # Token ids every sequence of the tree starts with.
  suffixes: list  # Distinct responses: each sequence's ids after `shared` (at least its EOS).

  def __len__(self):
    return len(self.shared) + sum(len(s) for s in self.suffixes)


def common_prefix(sequences) -> int:
  """Length of the longest common prefix, leaving every sequence at least one token (its EOS) of its own."""
  shortest = min(len(s) for s in sequences)
  first = sequences[0][:shortest - 1]
  same = np.ones(len(first), bool)
  for s in sequences[1:]:
    same &= s[:len(first)] == first
  return int(np.argmin(same)) if not same.all() else len(first)


def build_trees(sequences: list, row_length: int) -> tuple[list[Tree], list[tuple[int, int]]]:
  """Distinct `sequences` of one prompt -> trees that fit `row_length`, and (tree, response) of each sequence."""
  trees, where, start = [], [], 0
  while start < len(sequences):
    # Grow the tree while prompt + responses still fit one row (a single sequence always fits).
    end = start + 1
    while end < len(sequences):
      candidate = sequences[start:end + 1]
      shared = common_prefix(candidate)
      if shared + sum(len(s) - shared for s in candidate) > row_length:
        break
      end += 1
    members = sequences[start:end]
    shared = common_prefix(members) if len(members) > 1 else len(members[0]) - 1
    trees.append(Tree(members[0][:shared], [s[shared:] for s in members]))
    where += [(len(trees) - 1, k) for k in range(len(members))]
    start = end
  return trees, where


def grouped_order(prompt_group: np.ndarray, rng) -> np.ndarray:
  """A permutation of the pairs in which each prompt's pairs are consecutive (prompts and pairs shuffled)."""
  order = rng.permutation(len(prompt_group))
  by_prompt = {}
  for i in order:
    by_prompt.setdefault(int(prompt_group[i]), []).append(i)
  return np.concatenate([np.asarray(v, np.int64) for v in by_prompt.values()])


def trees_of(enc, pair_indices, row_length: int) -> tuple[list[Tree], list[tuple[int, int]]]:
  """The prompt trees of some pairs (`enc.prompt_group` says which share a prompt), and for each pair side in
  order (pair 0 chosen, pair 0 rejected, ...) its (tree, response) slot; a repeated response is one slot."""
  by_prompt = {}  # Prompt -> {sequence bytes: (index among the prompt's distinct sequences, ids)}.
  sides = []
  for i in pair_indices:
    distinct = by_prompt.setdefault(int(enc.prompt_group[i]), {})
    for ids in enc.ids[i]:
      sides.append((int(enc.prompt_group[i]), distinct.setdefault(ids.tobytes(), (len(distinct), ids))[0]))
  trees, slot_of = [], {}
  for prompt, distinct in by_prompt.items():
    prompt_trees, where = build_trees([ids for _, ids in distinct.values()], row_length)
    for k, (t, r) in enumerate(where):
      slot_of[prompt, k] = (len(trees) + t, r)
    trees += prompt_trees
  return trees, [slot_of[s] for s in sides]


def write_trees(trees, row_T, offset_T, width: int, tokens_RxL, positions_RxL, segments_RxL, branches_RxL) -> dict:
  """Lays `trees` into one group's rows (at the placement given); returns {(tree, response): flat EOS index}."""
  segments_in_row = np.zeros(tokens_RxL.shape[0], np.int32)
  eos_of = {}
  for t, (tree, row, offset) in enumerate(zip(trees, row_T, offset_T)):
    segments_in_row[row] += 1
    p = len(tree.shared)
    segments_RxL[row, offset:offset + len(tree)] = segments_in_row[row]
    tokens_RxL[row, offset:offset + p] = tree.shared
    positions_RxL[row, offset:offset + p] = np.arange(p)
    start = offset + p
    for k, suffix in enumerate(tree.suffixes):
      piece = slice(start, start + len(suffix))
      tokens_RxL[row, piece] = suffix
      positions_RxL[row, piece] = np.arange(p, p + len(suffix))
      branches_RxL[row, piece] = k + 1
      start += len(suffix)
      eos_of[t, k] = row * width + start - 1
  return eos_of
