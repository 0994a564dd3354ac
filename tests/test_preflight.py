"""Settings checked against what they meet before any device work: model positions, weight files, memory."""

import pytest

from jaxreward import configuration, model as model_lib, preflight, tokenizer as tokenizer_lib
from tests.conftest import load_config


def test_max_length_beyond_the_models_positions():
  config = load_config("tiny")
  config.model.init_from = "/models/sft"
  config.data.max_length = 256
  warnings = []
  preflight.check_positions(config, {"max_position_embeddings": 256}, warnings.append)
  with pytest.raises(configuration.ConfigError, match="data.max_length=256 exceeds max_position_embeddings=128"):
    preflight.check_positions(config, {"max_position_embeddings": 128}, warnings.append)
  assert not warnings
  preflight.check_positions(config, {"max_position_embeddings": 128,
                                     "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, warnings.append)
  assert len(warnings) == 1 and "RoPE scaling (linear)" in warnings[0]


def test_truncated_safetensors_is_one_line(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = tmp_path / "model.safetensors"
  save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  preflight.check_weights(str(tmp_path))
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  with pytest.raises(configuration.ConfigError, match="model.safetensors: not a complete safetensors file"):
    preflight.check_weights(str(tmp_path))


def test_memory_far_above_the_machine_stops_with_the_knobs():
  config = load_config("tiny")
  model_cfg = model_lib.ModelConfig.from_config(config.model, 512)
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  preflight.check_memory(config, model_cfg, mesh, print)
  config.data.max_length = 100_000
  with pytest.raises(configuration.ConfigError) as err:
    preflight.check_memory(config, model_cfg, mesh, print)
  message = str(err.value)
  assert "GiB per device" in message and "data.max_length" in message and "model.remat" in message


def test_tokenizer_folder_without_tokenizer_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(configuration.ConfigError, match="has no tokenizer files"):
    tokenizer_lib.load(str(tmp_path))
