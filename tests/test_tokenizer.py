"""Text -> ids: the encoded layout (prompt + response + EOS), special tokens, truncation, chat rendering."""

import pytest
import transformers
from tokenizers import processors

from jaxreward import synthetic, tokenizer
from jaxreward.configuration import ConfigError
from jaxreward.data import Pair

PAIRS = synthetic.generate(300, 0)


def bpe():
  return tokenizer.train_bpe(tokenizer.texts_for_tokenizer(PAIRS), 400)


def with_post_processor(template_single):
  """A tokenizer whose post-processor adds specials around text (BOS before, EOS/SEP after)."""
  tok = bpe()
  backend = tok.backend_tokenizer
  backend.post_processor = processors.TemplateProcessing(
      single=template_single, special_tokens=[("<|pad|>", 0), ("<|endoftext|>", 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                              pad_token="<|pad|>")


def test_sequence_is_prompt_response_eos():
  tok = bpe()
  enc = tokenizer.encode(PAIRS[:5], tok, 64, "keep_end")
  for pair, (chosen, rejected) in zip(enc.pairs, enc.ids):
    assert chosen[-1] == tok.eos_token_id and rejected[-1] == tok.eos_token_id
    assert tok.decode(chosen[:-1]) == pair.prompt + pair.chosen
    assert list(chosen).count(tok.eos_token_id) == 1


def test_leading_specials_kept_trailing_ones_not_mid_sequence():
  tok = with_post_processor("<|pad|> $A <|endoftext|>")  # BOS-like prefix, EOS-like suffix.
  assert tokenizer.leading_special_ids(tok) == [0]
  enc = tokenizer.encode(PAIRS[:3], tok, 64, "keep_end")
  for chosen, _ in enc.ids:
    assert chosen[0] == 0 and list(chosen).count(1) == 1 and chosen[-1] == 1


def test_keep_end_truncation_keeps_the_response():
  tok = bpe()
  long_prompt = "Which is larger " * 40
  pair = Pair(prompt=long_prompt, chosen=" 42 is larger.", rejected=" 17 is larger.")
  enc = tokenizer.encode([pair], tok, 16, "keep_end")
  assert enc.truncated == 1 and len(enc.ids[0][0]) == 16
  assert tok.decode(enc.ids[0][0][:-1]).endswith(" 42 is larger.")
  assert tokenizer.encode([pair], tok, 16, "drop").dropped == 1


# --- render -------------------------------------------------------------------------------------------------


class FakeChatTokenizer:
  """apply_chat_template with a pluggable renderer: lets each template quirk be tested in isolation."""

  chat_template = "fake"
  name_or_path = "fake"

  def __init__(self, renderer):
    self.renderer = renderer

  def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
    assert not tokenize
    return self.renderer(messages, add_generation_prompt)


def chatml(messages, gen, think=False):
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  return text + ("<|im_start|>assistant\n" + ("<think></think>" if think else "") if gen else "")


CONV = ([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])


def test_render_plain_template_is_the_documented_one():
  prompt, body = tokenizer.render(*CONV, tok=None)
  assert prompt == "<|user|>\nhi\n<|assistant|>\n" and body == "hello\n"
  assert tokenizer.render("Q", "A", None) == ("Q", "A")


def test_render_chat_template_prefix_and_fallback():
  prompt, body = tokenizer.render(*CONV, tok=FakeChatTokenizer(chatml))
  assert prompt.endswith("<|im_start|>assistant\n") and body == "hello<|im_end|>\n"
  # A generation prompt the whole conversation does not contain: split at the shared prefix, and the scored
  # text is still exactly the template's rendering of the conversation.
  tok = FakeChatTokenizer(lambda m, g: chatml(m, g, think=True))
  prompt, body = tokenizer.render(*CONV, tok=tok)
  assert prompt + body == chatml(CONV[0] + CONV[1], False) and "hello" in body


def test_render_template_that_drops_or_rejects_the_response_is_a_config_error():
  drops = FakeChatTokenizer(lambda m, g: chatml([x for x in m if x["role"] != "assistant"], g))
  with pytest.raises(ConfigError, match="drops the response"):
    tokenizer.render(*CONV, tok=drops)

  def strict(messages, gen):
    raise ValueError("Conversation roles must alternate user/assistant")
  with pytest.raises(ConfigError, match="cannot render the conversation starting 'hi'.*must alternate"):
    tokenizer.render(*CONV, tok=FakeChatTokenizer(strict))
