"""Hugging Face interop: import an SFT checkpoint, export a `*ForSequenceClassification` reward model.

transformers 5.x has no Flax classes, so the mapping between HF's safetensors names and our NNX
parameters lives here. HF `nn.Linear` weights are [out, in]; our kernels are [in, out], hence the
transposes. Reading and writing the tensors themselves (per-host slices, per-tensor gathers, shards) is
weights.py's job.

  model_config(folder, model_section) -> model.ModelConfig     (config.json -> our architecture)
  load_params(folder, params) -> params                         (each host reads only its devices' slices)
  write_weights(model, out_dir)                                 (gathered one tensor at a time)
  export(loaded_or_model, tokenizer, out_dir)                   (an HF folder that scores like we do)
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from jaxreward import export as export_lib, model as model_lib, tokenizer as tokenizer_lib
from jaxreward import weights as weights_lib
from jaxreward.configuration import ConfigError

# model_type -> the prefix of its HF classes (`LlamaConfig`, `LlamaForSequenceClassification`, ...).
_FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_HEADS = ("ForCausalLM", "ForSequenceClassification", "Model")
_ROPE_TYPES = ("default", "linear", "llama3")


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"hf: {folder!r} has no config.json; expected a Hugging Face model folder")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"hf: {path}: not valid JSON ({e})") from None


def _family(hf: dict, folder: str) -> str:
  model_type = hf.get("model_type", "")
  if model_type not in _FAMILIES:
    arch = ", ".join(hf.get("architectures") or []) or "?"
    raise ConfigError(f"hf: {folder}: architecture {arch!r} (model_type {model_type!r}) is not supported "
                      f"(supported: Llama, Qwen2, Mistral, SmolLM2)")
  family = _FAMILIES[model_type]
  for arch in hf.get("architectures") or []:
    if arch not in {family + h for h in _HEADS}:
      raise ConfigError(f"hf: {folder}: architecture {arch!r} is not supported "
                        f"(expected {family}ForCausalLM or {family}ForSequenceClassification)")
  return model_type


def _rope(hf: dict, folder: str) -> tuple[float, dict]:
  """(theta, scaling dict or {}), from either transformers 4's or 5's spelling."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling.update(params)
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  scaling.pop("type", None)
  kind = scaling.get("rope_type", "default")
  if kind not in _ROPE_TYPES:
    raise ConfigError(f"hf: {folder}: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
  if kind == "default":
    return theta, {}
  required = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
  missing = [k for k in required if k not in scaling]
  if missing:
    raise ConfigError(f"hf: {folder}: rope type {kind!r} needs {', '.join(missing)}")
  # Only the keys our RoPE reads: values like attention_factor would otherwise be silently ignored.
  return theta, {"rope_type": kind, **{k: scaling[k] for k in required}}


def model_config(folder: str, model_section) -> model_lib.ModelConfig:
  """The architecture of the HF model in `folder`; dtype, remat, scan_layers and attention come from the run's model
  section.

  The imported architecture is also written into `model_section`, so the run's saved config.json
  describes the model it trained (`artifacts.load` rebuilds it from there).
  """
  hf = read_hf_config(folder)
  model_type = _family(hf, folder)
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"hf: {folder}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
  if hf.get("mlp_bias"):
    raise ConfigError(f"hf: {folder}: mlp_bias=true is not supported")
  if model_type in ("llama", "mistral") and hf.get("attention_bias"):
    # Llama's attention_bias also biases o_proj, which our attention has no parameter for.
    raise ConfigError(f"hf: {folder}: attention_bias=true is not supported for {model_type}")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ConfigError(f"hf: {folder}: use_sliding_window=true is not supported")
  # Mistral's sliding_window (4096 and up) only matters past that many tokens; reward-model inputs are shorter.
  try:
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    arch = {"hidden_size": d, "num_layers": int(hf["num_hidden_layers"]), "num_heads": n,
            "num_kv_heads": int(hf.get("num_key_value_heads") or n), "head_dim": int(hf.get("head_dim") or d // n),
            "mlp_dim": int(hf["intermediate_size"]), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "qkv_bias": model_type == "qwen2",
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}  # False is these families' default.
    vocab_size = int(hf["vocab_size"])
  except KeyError as e:
    raise ConfigError(f"hf: {folder}/config.json lacks {e.args[0]!r}") from None
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise ConfigError(f"hf: {folder}/config.json: bad value ({e})") from None
  k, h = arch["num_kv_heads"], arch["head_dim"]
  if min(k, h, arch["num_layers"]) < 1 or n % k or h % 2:
    raise ConfigError(f"hf: {folder}: num_attention_heads={n}, num_key_value_heads={k}, head_dim={h} cannot be "
                      "mapped")
  arch["rope_theta"], scaling = _rope(hf, folder)
  # The section is the one description of the model (ModelConfig.from_config reads it; config.json saves it).
  for key, value in arch.items():
    model_section[key] = value
  model_section.rope_scaling = scaling or None
  return model_lib.ModelConfig.from_config(model_section, vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Names: our parameter paths <-> HF tensor names
# ---------------------------------------------------------------------------------------------------------------


def _block_names(cfg: model_lib.ModelConfig) -> dict:
  """A block's parameter path (within the block) -> (HF name after 'model.layers.{i}.', transpose?)."""
  m = {("attn_norm", "scale"): ("input_layernorm.weight", False),
       ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False)}
  for ours, theirs in (("q_DxNH", "q_proj"), ("k_DxKH", "k_proj"), ("v_DxKH", "v_proj"), ("o_NHxD", "o_proj")):
    m[("attn", ours)] = (f"self_attn.{theirs}.weight", True)
  if cfg.qkv_bias:
    for ours, theirs in (("q_bias_NH", "q_proj"), ("k_bias_KH", "k_proj"), ("v_bias_KH", "v_proj")):
      m[("attn", ours)] = (f"self_attn.{theirs}.bias", False)
  for ours, theirs in (("gate_DxF", "gate_proj"), ("up_DxF", "up_proj"), ("down_FxD", "down_proj")):
    m[("mlp", ours)] = (f"mlp.{theirs}.weight", True)
  return m


def name_map(cfg: model_lib.ModelConfig) -> dict:
  """Our parameter path -> its `weights` entry: (HF name, transpose?), backbone names with HF's 'model.' prefix.

  With `cfg.scan_layers` a block parameter is one leaf with a leading layers axis: its entry is a list of
  (HF name, transpose?), item i naming the tensor of `leaf[i]` (layer i). Unstacked block parameters (path
  `backbone.blocks.{i}...`) have one (name, transpose?) each.
  """
  m = {("backbone", "embed_VxD"): ("model.embed_tokens.weight", False),
       ("backbone", "final_norm", "scale"): ("model.norm.weight", False),
       ("score_Dx1",): ("score.weight", True)}
  if not cfg.tie_embeddings:
    m[("lm_head_DxV",)] = ("lm_head.weight", True)
  layers = [f"model.layers.{i}." for i in range(cfg.num_layers)]
  for ours, (theirs, transpose) in _block_names(cfg).items():
    if cfg.scan_layers:
      m[("backbone", "blocks") + ours] = [(p + theirs, transpose) for p in layers]
    else:
      m.update({("backbone", "blocks", i) + ours: (p + theirs, transpose) for i, p in enumerate(layers)})
  return m


def _config_of(params) -> model_lib.ModelConfig:
  """Reads the architecture and layer layout back from parameter shapes (enough for `name_map`)."""
  flat = dict(nnx.to_flat_state(params))
  block_paths = [p for p in flat if p[:2] == ("backbone", "blocks")]
  stacked = not isinstance(block_paths[0][2], int)
  if stacked:
    num_layers = flat[("backbone", "blocks", "attn_norm", "scale")].shape[0]
  else:
    num_layers = len({p[2] for p in block_paths})
  v, d = flat[("backbone", "embed_VxD")].shape
  qkv_bias = any(p[-1] == "q_bias_NH" for p in flat)
  return model_lib.ModelConfig(vocab_size=v, hidden_size=d, num_layers=num_layers, num_heads=1, num_kv_heads=1,
                               head_dim=2, mlp_dim=1, qkv_bias=qkv_bias,
                               tie_embeddings=("lm_head_DxV",) not in flat, scan_layers=stacked)


# ---------------------------------------------------------------------------------------------------------------
# Loading weights
# ---------------------------------------------------------------------------------------------------------------


def _hf_names(cfg: model_lib.ModelConfig, reader: weights_lib.Reader) -> dict:
  """`name_map` with the 'model.' prefix as the file spells it (bare `LlamaModel` checkpoints have none)."""
  prefix = "model." if any(n.startswith("model.") for n in reader.where) else ""
  rename = lambda n: prefix + n[len("model."):] if n.startswith("model.") else n
  return {ours: [(rename(n), t) for n, t in entry] if isinstance(entry, list) else (rename(entry[0]), entry[1])
          for ours, entry in name_map(cfg).items()}


def _entry_names(entry) -> list[str]:
  return [n for n, _ in entry] if isinstance(entry, list) else [entry[0]]


def load_params(folder: str, params, reader: weights_lib.Reader | None = None):
  """Returns `params` with every weight read from `folder`, each placed in its leaf's existing sharding.

  Each process reads only the slices of each tensor that its own devices hold (once per slice), converted
  to the parameter's dtype, so no host reads the whole checkpoint and no host or device holds more than
  its share of a tensor. `reader` (a `weights.Reader` of `folder`) may be passed to read its `bytes_read`
  afterwards. A checkpoint without `score.weight` (a causal LM) keeps the freshly initialised reward head;
  a sequence-classification checkpoint (no `lm_head`) keeps the fresh, unused LM head of an untied model.
  """
  reader = reader or weights_lib.Reader(folder)
  cfg = _config_of(params)
  hf_names = _hf_names(cfg, reader)
  optional = {"score.weight"}
  if "score.weight" in reader.where:
    optional.add("lm_head.weight")
  expected = [n for entry in hf_names.values() for n in _entry_names(entry)]
  missing = [n for n in expected if n not in reader.where and n not in optional]
  if missing:
    raise ConfigError(f"hf: {folder}: missing weight {missing[0]}" +
                      (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  # A tied checkpoint may still carry the (duplicate) LM head; rotary buffers are recomputed.
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  known = set(expected) | ignorable
  unexpected = [n for n in reader.where if n not in known and not n.endswith("rotary_emb.inv_freq")]
  if unexpected:
    raise ConfigError(f"hf: {folder}: unexpected weight {unexpected[0]} cannot be mapped" +
                      (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

  flat = []
  for path, var in nnx.to_flat_state(params):
    entry = hf_names[path]
    if any(n not in reader.where for n in _entry_names(entry)):  # An optional head the file lacks.
      flat.append((path, var))
      continue
    flat.append((path, var.replace(weights_lib.load(reader, entry, var.get_value()))))
  return nnx.from_flat_state(flat)


def hf_tensors(params, cfg: model_lib.ModelConfig, *, with_lm_head: bool = False) -> list:
  """(HF name, shape, float32, fetch) per tensor of a `*ForSequenceClassification` (plus the LM head if asked).

  `fetch()` gathers that one tensor (one layer of a stacked parameter) to every process, transposed to HF's
  layout: callers hold at most what they keep of the fetched tensors, never the whole model at once.
  """
  names, out = name_map(cfg), []
  for path, var in nnx.to_flat_state(params):
    entry = names[path]
    value = var.get_value()
    layers = list(enumerate(entry)) if isinstance(entry, list) else [(None, entry)]
    for layer, (name, transpose) in layers:
      if name == "lm_head.weight" and not with_lm_head:
        continue  # *ForSequenceClassification has no LM head; scoring never used it.
      shape = tuple(value.shape[1:] if layer is not None else value.shape)

      def fetch(value=value, layer=layer, transpose=transpose):
        host = weights_lib.gathered(value, layer)
        return host.T if transpose else host

      out.append((name, shape[::-1] if transpose else shape, np.float32, fetch))
  return out


def write_weights(model: model_lib.RewardModel, out_dir: str,
                  max_shard_bytes: int = weights_lib.DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes the model's HF weights (float32) into `out_dir`, gathered one tensor at a time: one
  `model.safetensors`, or shards of at most `max_shard_bytes` plus their index. Every process of a
  multi-host job calls it; process 0 writes. Returns the weight files' names."""
  _, params = nnx.split(model, nnx.Param)
  return weights_lib.write(hf_tensors(params, model.cfg), out_dir, max_shard_bytes, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _hf_config(cfg: model_lib.ModelConfig, model_type: str, tokenizer, max_positions: int):
  import transformers  # pylint: disable=g-import-not-at-top
  family = _FAMILIES[model_type]
  if model_type == "qwen2" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    raise ConfigError(f"hf: Qwen2 cannot express head_dim={cfg.head_dim} with hidden_size={cfg.hidden_size} and "
                      f"{cfg.num_heads} heads")
  if cfg.qkv_bias != (model_type == "qwen2"):
    raise ConfigError(f"hf: a model {'with' if cfg.qkv_bias else 'without'} q/k/v bias cannot be exported as "
                      f"{family}")
  rope = {"rope_type": "default", **dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
  kwargs = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      hidden_act="silu", max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, num_labels=1,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
      bos_token_id=getattr(tokenizer, "bos_token_id", None))
  if model_type != "qwen2":
    kwargs["head_dim"] = cfg.head_dim
  if model_type == "mistral":
    kwargs["sliding_window"] = None
  hf_cfg = getattr(transformers, family + "Config")(**kwargs)
  hf_cfg.architectures = [family + "ForSequenceClassification"]
  hf_cfg.id2label, hf_cfg.label2id = {0: "reward"}, {"reward": 0}
  return hf_cfg


def export(loaded_or_model, tokenizer, out_dir: str, *, model_type: str | None = None,
           reward_stats: dict | None = None, max_length: int | None = None,
           max_shard_bytes: int = weights_lib.DEFAULT_SHARD_BYTES) -> str:
  """Writes an HF `*ForSequenceClassification` folder whose plain transformers scores equal ours.

  `loaded_or_model` is an `artifacts.Loaded` (then the training max_length, the checkpoint's validation reward
  statistics and accuracies come along) or a bare `RewardModel` (then `max_length`, default the model's
  context length). `model_type` (llama | qwen2 | mistral) defaults to the family of the run's `init_from`
  model, else qwen2 when q/k/v carry a bias and llama otherwise. The tokenizer is written by
  `export.save_tokenizer` (encodes as training did, checked), the README.md is the export's own model card.
  Weights go through `write_weights`: one `model.safetensors`, or shards of at most `max_shard_bytes`.
  """
  model = getattr(loaded_or_model, "model", loaded_or_model)
  workdir = getattr(loaded_or_model, "workdir", None)
  cfg = model.cfg
  if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
    # HF scores the last token that is not pad; pad == EOS would make it score the token before our EOS.
    raise ConfigError("hf: the tokenizer's pad token must exist and differ from EOS (use tokenizer.load)")
  if tokenizer.pad_token_id >= cfg.vocab_size:
    raise ConfigError(f"hf: pad_token_id {tokenizer.pad_token_id} is outside the vocabulary ({cfg.vocab_size})")
  max_positions = 4096
  init_from = workdir and loaded_or_model.config.model.init_from
  if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
    init_hf = read_hf_config(init_from)
    model_type = model_type or init_hf.get("model_type")
    max_positions = int(init_hf.get("max_position_embeddings", max_positions))
  model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
  if model_type not in _FAMILIES:
    raise ConfigError(f"hf: cannot export as {model_type!r} (supported: {', '.join(_FAMILIES)})")
  max_length = max_length or (loaded_or_model.config.data.max_length if workdir else max_positions)

  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = _hf_config(cfg, model_type, tokenizer, max_positions)
  hf_cfg.save_pretrained(out_dir)
  # transformers 5 writes only id2label; RL stacks read num_labels, so state it explicitly.
  config_path = os.path.join(out_dir, "config.json")
  with open(config_path) as f:
    config_json = json.load(f)
  with open(config_path, "w") as f:
    json.dump({**config_json, "num_labels": 1}, f, indent=2, sort_keys=True)
  write_weights(model, out_dir, max_shard_bytes)
  exported_tok = export_lib.save_tokenizer(tokenizer, out_dir, max_length)

  step = getattr(loaded_or_model, "step", None)
  evaluation, summary = (export_lib.eval_row(workdir, step), export_lib.summary(workdir)) if workdir else ({}, {})
  if reward_stats is None and "val_reward_std" in evaluation:
    reward_stats = {"mean": evaluation["val_reward_mean"], "std": evaluation["val_reward_std"],
                    "source": f"validation rewards at step {step} (metrics.jsonl)", "step": step}
  if reward_stats is not None:
    # RL trainers normalise rewards as (r - mean) / std; the scorer reads max_length from here too.
    reward_stats = {**reward_stats, "max_length": max_length}
    with open(os.path.join(out_dir, "reward_normalization.json"), "w") as f:
      json.dump(reward_stats, f, indent=2)
  card = export_lib.model_card(
      family=_FAMILIES[model_type], max_length=max_length, eos=exported_tok.eos_token,
      leading=exported_tok.convert_ids_to_tokens(tokenizer_lib.leading_special_ids(exported_tok)), stats=reward_stats,
      evaluation=evaluation, summary=summary, step=step, source=workdir)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(card)
  return out_dir
