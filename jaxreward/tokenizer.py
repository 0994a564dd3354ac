"""Text -> token ids: the tokenizer (a byte-level BPE trained on the training texts, or any HF tokenizer
folder), how a pair's sides are rendered (chat templates or a plain template) and encoded (EOS, truncation).

Whatever the source, the result is a `PreTrainedTokenizerFast` with an EOS token (appended to every
response, so the reward is always read at EOS) and a pad token distinct from EOS: HF's
`*ForSequenceClassification` scores the last token that is not the pad token, so pad == EOS would make
it score the token before ours. The tokenizer is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxreward import storage
from jaxreward.configuration import ConfigError
from jaxreward.data import Pair

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


def save(tok, workdir: str, name: str = "tokenizer") -> str:
  """Saves into `<workdir>/<name>` (any epath location: written locally, then copied up)."""
  path = storage.join(workdir, name)
  with storage.writing_folder(path) as local:
    tok.save_pretrained(local)
  return path


def load_saved(workdir: str, name: str = "tokenizer") -> transformers.PreTrainedTokenizerBase:
  """The tokenizer `save` left in `<workdir>/<name>` (from a local copy when the work dir is remote)."""
  with storage.local_copy(storage.join(workdir, name)) as local:
    return load(local)


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
  prompt_group: np.ndarray | None = None  # [pair] int: pairs with equal values share a prompt (graphs.py).
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
  out.prompt_group = prompt_groups(out.pairs)
  return out


def prompt_groups(pairs: list[Pair]) -> np.ndarray:
  prompts = {}
  return np.array([prompts.setdefault(p.prompt_key(), len(prompts)) for p in pairs], np.int64)


def concatenate(parts: list[Encoded]) -> Encoded:
  """One Encoded of consecutive blocks of pairs encoded apart: what encoding them together gives."""
  pairs = [p for part in parts for p in part.pairs]
  return Encoded(ids=[x for part in parts for x in part.ids],
                 margin=np.asarray([p.margin for p in pairs], np.float32), pairs=pairs,
                 truncated=sum(part.truncated for part in parts), prompt_group=prompt_groups(pairs),
                 dropped=sum(part.dropped for part in parts))


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
