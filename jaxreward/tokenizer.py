"""Tokenizers: a byte-level BPE trained on the training texts, or any HF tokenizer folder.

Whatever the source, the result is a `PreTrainedTokenizerFast` with an EOS token (appended to every
response, so the reward is always read at EOS) and a pad token distinct from EOS: HF's
`*ForSequenceClassification` scores the last token that is not the pad token, so pad == EOS would make
it score the token before ours. The tokenizer is saved beside every checkpoint.
"""

from __future__ import annotations

import os

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxreward.configuration import ConfigError

PAD, EOS = "<|pad|>", "<|endoftext|>"


def train_bpe(texts, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


# A folder with none of these has no tokenizer (transformers would then blame a missing sentencepiece).
_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load(path: str) -> transformers.PreTrainedTokenizerBase:
  if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _FILES):
    raise ConfigError(f"tokenizer: {path} has no tokenizer files ({', '.join(_FILES[:3])}, ...); add them, or point "
                      "data.tokenizer at a folder that has them")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:  # transformers raises many types for a folder it cannot read.
    raise ConfigError(f"tokenizer: cannot load an HF tokenizer from {path!r} ({type(e).__name__}: {e})") from None
  if tok.eos_token_id is None:
    raise ConfigError(f"tokenizer: {path!r} defines no EOS token; responses must end with one")
  if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
    # Prefer an existing special token over adding one: adding would grow the vocabulary past the model's.
    spare = [t for t, i in zip(tok.all_special_tokens, tok.all_special_ids) if i != tok.eos_token_id]
    tok.pad_token = spare[0] if spare else tok.convert_ids_to_tokens(0 if tok.eos_token_id else 1)
  return tok


def vocab_size(tok) -> int:
  return len(tok)


def save(tok, workdir: str) -> str:
  path = os.path.join(workdir, "tokenizer")
  tok.save_pretrained(path)
  return path
