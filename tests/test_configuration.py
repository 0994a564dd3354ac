"""Bad configs fail before any compute, with one line naming the key."""

import json
import subprocess
import sys

import ml_collections
import pytest

from jaxreward import artifacts, configuration, model as model_lib
from tests.conftest import ROOT, load_config


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_configs_validate(name):
  configuration.validate(load_config(name))


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "schedule", "exponential", "train.schedule='exponential'; expected one of cosine, linear, constant"),
    ("train", "batch_size", 0, "train.batch_size=0; expected a positive number"),
    ("data", "truncation", "middle", "data.truncation"),
    ("data", "validation_fraction", 1.5, "validation_fraction"),
    ("data", "max_length", 100, "multiple of 8"),
    ("data", "train_path", "/nonexistent/pairs.jsonl", "does not exist"),
    ("model", "num_kv_heads", 3, "multiple of num_kv_heads"),
    ("model", "attention", "cudnn", "needs model.dtype='bfloat16'"),
    ("data", "pack_length", 60, "data.pack_length=60; expected 0 or a multiple of 8 >= data.max_length"),
    ("gate", "max_gap", 2.0, "gate.max_gap"),
    ("mesh", "tensor", 0, "mesh.tensor=0"),
    ("model", "remat", "sometimes", "model.remat='sometimes'; expected one of none, save_matmuls, full"),
])
def test_bad_values(section, key, value, message):
  config = load_config("tiny")
  config[section][key] = value
  with pytest.raises(configuration.ConfigError, match=None) as err:
    configuration.validate(config)
  assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value,policy", [("True", "full"), ("false", "none"), ("save_matmuls", "save_matmuls")])
def test_remat_accepts_the_old_booleans(tmp_path, value, policy):
  """--config.model.remat=True (a string: the field is one) and a work dir's config.json from before the policies
  (a JSON boolean) both still mean what they meant."""
  config = load_config("tiny")
  config.model.remat = value
  configuration.validate(config)
  assert model_lib.ModelConfig.from_config(config.model, 64).remat == policy
  raw = config.to_dict()
  raw["model"]["remat"] = value.lower() == "true" if value in ("True", "false") else value
  (tmp_path / "config.json").write_text(json.dumps(raw))
  assert artifacts.read_config(str(tmp_path)).model.remat == policy


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "large", "smollm2_135m"])
def test_configs_scan_deep_models_and_map_the_layers_axis(name):
  config = load_config(name)
  # smollm2_135m runs unrolled: on CPU its scan costs step time and memory (the comment in that config).
  assert config.model.scan_layers == (name in ("medium", "large"))
  assert ("layers", None) in [tuple(rule) for rule in config.mesh.rules]


def test_cudnn_takes_packed_rows_but_not_yet_shared_prompts():
  """cuDNN takes packed rows (as a dense mask; equal to the reference on an H100), only in bf16; shared-prompt
  rows wait for their GPU check."""
  config = load_config("tiny")
  config.model.attention, config.model.dtype, config.data.packing = "cudnn", "bfloat16", True
  configuration.validate(config)
  config.data.group_by_prompt = True
  with pytest.raises(configuration.ConfigError, match="group_by_prompt needs model.attention='auto' or 'xla'"):
    configuration.validate(config)


def test_unknown_key():
  config = load_config("tiny")
  with config.unlocked():
    config.train.learning_rat = 1.0
  with pytest.raises(configuration.ConfigError, match="unknown key train.learning_rat"):
    configuration.validate(config)


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "jaxreward.main", "--config", str(ROOT / "configs/tiny.py"), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_override_without_traceback(tmp_path):
  proc = run_main("--workdir", str(tmp_path), "--config.train.learning_rat=1e-3")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr and "learning_rat" in proc.stderr


def test_cli_bad_value_exits_2_with_one_line(tmp_path):
  proc = run_main("--workdir", str(tmp_path / "w"), "--config.train.schedule=exponential")
  assert proc.returncode == configuration.EXIT_BAD_INPUT
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "train.schedule" in errors[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()  # Failed before any compute or output.


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "learning_rate", float("inf"), "train.learning_rate=inf; expected a finite number"),
    ("train", "adam_eps", float("nan"), "train.adam_eps=nan; expected a finite number"),
    ("train", "num_steps", None, "train.num_steps=None (NoneType); expected an integer"),
    ("train", "batch_size", 16.0, "train.batch_size=16.0 (float); expected an integer"),
    ("data", "packing", "yes", "data.packing='yes' (str); expected True or False"),
    ("data", "train_path", 3, "data.train_path=3 (int); expected a string"),
])
def test_wrong_types_none_and_non_finite_numbers(section, key, value, message):
  config = load_config("tiny").to_dict()
  config[section][key] = value
  with pytest.raises(configuration.ConfigError) as err:
    configuration.validate(ml_collections.ConfigDict(config))
  assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_override_names_the_closest_keys():
  with pytest.raises(configuration.ConfigError, match=r"unknown key train.save_every; did you mean train.eval_every"):
    configuration.check_overrides(["main", "--config.train.save_every=5"])
  with pytest.raises(configuration.ConfigError, match=r"unknown key trian.seed; did you mean train.seed"):
    configuration.check_overrides(["main", "--config.trian.seed=1"])
  configuration.check_overrides(["main", "--config.train.eval_every=5", "--config.mesh.rules=[]"])


@pytest.mark.parametrize("body,args,message", [
    ("def get_config():\n  raise RuntimeError('boom')\n", [], "RuntimeError: boom"),
    ("from jaxreward import configuration\ndef get_config():\n  c = configuration.defaults()\n"
     "  c.train.batch_size = '32'\n  return c\n", [], "TypeError: Could not override field 'batch_size'"),
    ("def get_config():\n  return {'train': {}}\n", [], "get_config() returned a dict"),
    (None, ["--config.train.save_every=5"], "unknown key train.save_every; did you mean train.eval_every"),
    (None, ["--config.train.learning_rate=inf"], "train.learning_rate=inf; expected a finite number"),
])
def test_cli_config_problems_are_one_line_exit_2(tmp_path, body, args, message):
  config = ROOT / "configs" / "tiny.py"
  if body is not None:
    config = tmp_path / "bad_config.py"
    config.write_text(body)
  result = subprocess.run([sys.executable, "-m", "jaxreward.main", "--config", str(config), "--workdir",
                           str(tmp_path / "run"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == configuration.EXIT_BAD_INPUT, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr[-2000:]
  assert not (tmp_path / "run").exists()
