"""The training corpus: read the configured source, clean it, split it, tokenize it."""

from __future__ import annotations

import dataclasses

from jaxreward import configuration, data, pipeline, synthetic, tokenizer as tokenizer_lib


@dataclasses.dataclass
class PreparedData:
  tokenizer: object
  train: pipeline.Encoded
  validation: pipeline.Encoded
  stats: dict


def prepare(config, log) -> PreparedData:
  """Reads, cleans, splits and tokenizes the configured data; every problem is a one-line ConfigError."""
  d, seed = config.data, config.train.seed
  stats = {"bad_lines_skipped": 0, "skip_reasons": [], "duplicates_removed": 0, "leaks_removed": 0}

  def read(path):
    pairs, rep = data.load_pairs(path, d.format, d.on_bad_line)
    stats["bad_lines_skipped"] += rep.skipped
    stats["skip_reasons"] += rep.skip_reasons
    if rep.skipped:
      log(f"data: skipped {rep.skipped} bad lines of {path}; first: {'; '.join(rep.skip_reasons[:3])}")
    return pairs

  if not d.train_path:
    train_pairs, val_pairs = data.split(synthetic.generate(d.synthetic_pairs, seed), d.validation_fraction, seed)
  else:
    all_pairs, stats["duplicates_removed"] = data.deduplicate(read(d.train_path))
    if d.validation_path:
      val_pairs, dups = data.deduplicate(read(d.validation_path))
      stats["duplicates_removed"] += dups
      train_pairs, stats["leaks_removed"] = data.remove_leaks(all_pairs, val_pairs)
    else:
      train_pairs, val_pairs = data.split(all_pairs, d.validation_fraction, seed)
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
    tok = tokenizer_lib.train_bpe(pipeline.texts_for_tokenizer(train_pairs), d.vocab_size)
  train = pipeline.encode(train_pairs, tok, d.max_length, d.truncation)
  validation = pipeline.encode(val_pairs, tok, d.max_length, d.truncation)
  if len(train) < config.train.batch_size or not len(validation):
    raise configuration.ConfigError(
        f"data: {len(train)} training / {len(validation)} validation pairs left after truncation "
        f"({d.truncation}); need at least one batch ({config.train.batch_size}) and one validation pair")
  stats.update(train_pairs=len(train), val_pairs=len(validation), truncated_pairs=train.truncated + validation.truncated,
               dropped_pairs=train.dropped + validation.dropped)
  return PreparedData(tok, train, validation, stats)
