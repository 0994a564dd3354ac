"""The training corpus: read the configured source, clean it, split it, tokenize it.

Sources: `data.train_path` (+ optional `validation_path`) files, a TFDS dataset (`data.source = "tfds"`,
splits train + optional validation, see tfds_data.py), or the embedded synthetic task. Whatever the
source, exact-duplicate pairs are dropped (first copy kept), and training pairs whose prompt also occurs in
an explicit validation set are dropped ("leaks"); without one, the 80/20 split is grouped by prompt so none
can occur. Every count goes into `stats` (and from there metrics.json and the model card).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io

import jax
import numpy as np

from jaxreward import configuration, data, hosts, storage, synthetic, tfds_data, tokenizer as tokenizer_lib

STAGED_TOKENIZER = "tokenizer.trained"  # Host 0's BPE while the other hosts load it.
STAGED_TOKENS = "tokens.staged"  # Each host's block of token ids while the others read it.


@dataclasses.dataclass
class PreparedData:
  tokenizer: object
  train: tokenizer_lib.Encoded
  validation: tokenizer_lib.Encoded
  stats: dict


def prepare(config, log, workdir: str | None = None) -> PreparedData:
  """Reads, cleans, splits and tokenizes the configured data; every problem is a one-line ConfigError.

  A BPE tokenizer to train is trained by host 0 alone and handed to the others through `workdir`."""
  d, seed = config.data, config.train.seed
  stats = {"bad_lines_skipped": 0, "skip_reasons": [], "duplicates_removed": 0, "leaks_removed": 0,
           "one_empty_response_kept": 0, "tie_pairs_skipped": 0}

  def account(pairs, rep):
    stats["bad_lines_skipped"] += rep.skipped
    stats["skip_reasons"] += rep.skip_reasons
    stats["one_empty_response_kept"] += rep.one_empty
    stats["tie_pairs_skipped"] += rep.tie_pairs
    if rep.tie_pairs:
      log(f"data: {rep.tie_pairs} tied response pairs of ranked lines in {rep.path} are no comparison: not trained on")
    if rep.skipped:
      log(f"data: skipped {rep.skipped} bad lines of {rep.path}; first: {'; '.join(rep.skip_reasons[:3])}")
    if rep.one_empty:
      log(f"data: kept {rep.one_empty} pairs of {rep.path} whose chosen or rejected response is empty")
    return pairs

  if d.source == "tfds":
    if d.train_path or d.validation_path:
      raise configuration.ConfigError("config: data.source='tfds' reads data.tfds_name from data.tfds_data_dir; "
                                      "leave data.train_path and data.validation_path empty")
    splits = tfds_data.read(d.tfds_name, d.tfds_data_dir, d.format, d.on_bad_line)
    train_read = account(*splits["train"])
    val_read = account(*splits["validation"]) if "validation" in splits else None
  elif d.train_path:
    train_read = account(*data.load_pairs(d.train_path, d.format, d.on_bad_line))
    val_read = account(*data.load_pairs(d.validation_path, d.format, d.on_bad_line)) if d.validation_path else None
  else:
    train_read = val_read = None

  if train_read is None:
    made = (synthetic.generate(d.synthetic_pairs, seed) if d.synthetic_responses == 2 else
            synthetic.generate_ranked(d.synthetic_pairs, d.synthetic_responses, seed))
    train_pairs, val_pairs = split(made, d.validation_fraction, seed)
  else:
    all_pairs, stats["duplicates_removed"] = deduplicate(train_read)
    if val_read is not None:
      val_pairs, dups = deduplicate(val_read)
      stats["duplicates_removed"] += dups
      train_pairs, stats["leaks_removed"] = remove_leaks(all_pairs, val_pairs)
    else:
      train_pairs, val_pairs = split(all_pairs, d.validation_fraction, seed)
    if stats["duplicates_removed"] or stats["leaks_removed"]:
      log(f"data: removed {stats['duplicates_removed']} duplicate pairs and {stats['leaks_removed']} training "
          "pairs whose prompt is in the validation set")
  if not train_pairs or not val_pairs:
    raise configuration.ConfigError(f"data: {len(train_pairs)} training and {len(val_pairs)} validation pairs "
                                    "after splitting; both must be non-empty")
  minimum = d.min_pairs
  if len(train_pairs) + len(val_pairs) < minimum or len(train_pairs) < 0.8 * minimum or len(val_pairs) < 0.2 * minimum:
    log(f"warning: {len(train_pairs)} train / {len(val_pairs)} validation pairs is below the recommended "
        f"{minimum} pairs ({int(0.8 * minimum)} / {int(0.2 * minimum)}); accuracies will be noisy")

  tok_path = d.tokenizer or config.model.init_from
  if tok_path:
    tok = tokenizer_lib.load(tok_path)
  else:
    tok = trained_tokenizer(train_pairs, d.vocab_size, workdir)
  train = encode_across_hosts(train_pairs, tok, d, workdir, "train")
  validation = encode_across_hosts(val_pairs, tok, d, workdir, "validation")
  if hosts.several() and hosts.is_main() and workdir is not None:
    storage.path(storage.join(workdir, STAGED_TOKENS)).rmtree(missing_ok=True)
  if len(train) < config.train.batch_size or not len(validation):
    raise configuration.ConfigError(
        f"data: {len(train)} training / {len(validation)} validation pairs left after truncation "
        f"({d.truncation}); need at least one batch ({config.train.batch_size}) and one validation pair")
  stats.update(train_pairs=len(train), val_pairs=len(validation), truncated_pairs=train.truncated + validation.truncated,
               dropped_pairs=train.dropped + validation.dropped)
  if stats["truncated_pairs"] or stats["dropped_pairs"]:
    log(f"data: {stats['truncated_pairs']} pairs cut to max_length={d.max_length} (keep_end) and "
        f"{stats['dropped_pairs']} dropped as too long (truncation={d.truncation})")
  return PreparedData(tok, train, validation, stats)


def trained_tokenizer(train_pairs: list[data.Pair], vocab_size: int, workdir: str | None):
  """A BPE trained on the training texts. With several hosts, host 0 trains it and saves it in the work dir
  (under a name that is not one of the run's files until it is loaded everywhere), the others load it."""
  if not hosts.several():
    return tokenizer_lib.train_bpe(tokenizer_lib.texts_for_tokenizer(train_pairs), vocab_size)
  if hosts.is_main():
    tok = tokenizer_lib.train_bpe(tokenizer_lib.texts_for_tokenizer(train_pairs), vocab_size)
    tokenizer_lib.save(tok, workdir, STAGED_TOKENIZER)
  hosts.barrier("tokenizer trained")
  if not hosts.is_main():
    tok = tokenizer_lib.load_saved(workdir, STAGED_TOKENIZER)
  hosts.barrier("tokenizer loaded")
  if hosts.is_main():
    storage.path(storage.join(workdir, STAGED_TOKENIZER)).rmtree()
  return tok


def encode_across_hosts(pairs: list[data.Pair], tok, data_cfg, workdir: str | None,
                        name: str) -> tokenizer_lib.Encoded:
  """`tokenizer.encode(pairs)` on every host, each host tokenizing only its block of the pairs (`hosts.block`).

  Each host leaves its block's token ids in the work dir (STAGED_TOKENS, any storage.py location: the work dir
  of a multi-host job is shared), then, after a barrier, every host reads all blocks: the global packing plan
  needs every pair's lengths, so all hosts end with the whole, identical Encoded. One host, or no work dir:
  the whole list here."""
  if not hosts.several() or workdir is None:
    return tokenizer_lib.encode(pairs, tok, data_cfg.max_length, data_cfg.truncation)
  start, stop = hosts.block(len(pairs))
  files = [storage.path(storage.join(workdir, STAGED_TOKENS, f"{name}.{p}.npz")) for p in range(jax.process_count())]
  try:
    block = _block_bytes(tokenizer_lib.encode(pairs[start:stop], tok, data_cfg.max_length, data_cfg.truncation),
                         pairs, start)
  except configuration.ConfigError as e:  # A bad pair in one host's block: every host must stop, not wait.
    block = str(e).encode()
  storage.write_atomically(files[jax.process_index()], block)
  hosts.barrier(f"{name} tokenized")
  raw = [f.read_bytes() for f in files]
  hosts.barrier(f"{name} tokens read")  # Then host 0 may remove the files (prepare, once both splits are read).
  errors = [r.decode() for r in raw if not r.startswith(_NPZ)]
  if errors:
    raise configuration.ConfigError(errors[0])
  return tokenizer_lib.concatenate([_read_block(r, pairs) for r in raw])


_NPZ = b"PK"  # np.savez writes a zip file; an error message never starts so.


def _block_bytes(enc: tokenizer_lib.Encoded, pairs: list[data.Pair], start: int) -> bytes:
  index = {id(p): i for i, p in enumerate(pairs[start:], start)}
  ids = [side for sides in enc.ids for side in sides]
  buffer = io.BytesIO()
  np.savez(buffer, kept=np.array([index[id(p)] for p in enc.pairs], np.int64), lengths=enc.lengths(),
           ids=np.concatenate(ids) if ids else np.zeros(0, np.int32), counts=np.array([enc.truncated, enc.dropped]))
  return buffer.getvalue()


def _read_block(raw: bytes, pairs: list[data.Pair]) -> tokenizer_lib.Encoded:
  with np.load(io.BytesIO(raw)) as f:
    kept, lengths, ids, (truncated, dropped) = f["kept"], f["lengths"], f["ids"], f["counts"]
  sides = np.split(ids, np.cumsum(lengths.reshape(-1))[:-1]) if len(kept) else []
  chosen = [pairs[i] for i in kept]
  return tokenizer_lib.Encoded(ids=[[sides[2 * k], sides[2 * k + 1]] for k in range(len(kept))],
                               margin=np.asarray([p.margin for p in chosen], np.float32), pairs=chosen,
                               truncated=int(truncated), dropped=int(dropped))


def deduplicate(pairs: list[data.Pair]) -> tuple[list[data.Pair], int]:
  seen, out = set(), []
  for pair in pairs:
    k = pair.key()
    if k not in seen:
      seen.add(k)
      out.append(pair)
  return out, len(pairs) - len(out)


def _rank(key: str, seed: int) -> str:
  return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split(pairs: list[data.Pair], fraction: float, seed: int) -> tuple[list[data.Pair], list[data.Pair]]:
  """Deterministic split grouped by prompt: the first `fraction` of prompt groups in seeded-hash order."""
  groups = collections.defaultdict(list)
  for pair in pairs:
    groups[pair.prompt_key()].append(pair)
  order = sorted(groups, key=lambda k: _rank(k, seed))
  target, validation, train = fraction * len(pairs), [], []
  for k in order:
    (validation if len(validation) < target else train).extend(groups[k])
  return train, validation


def remove_leaks(train: list[data.Pair], validation: list[data.Pair]) -> tuple[list[data.Pair], int]:
  """Drops training pairs whose prompt group also occurs in validation (explicit validation files)."""
  held_out = {p.prompt_key() for p in validation}
  kept = [p for p in train if p.prompt_key() not in held_out]
  return kept, len(train) - len(kept)
