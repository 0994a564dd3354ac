"""Output paths: an export never mixes with an existing folder or lands in a work dir; score --out is checked
before the model loads."""

import importlib.util
import json
import os

import pytest

from jaxreward import configuration, outputs
from jaxreward.commands import score as score_cmd
from tests.conftest import ROOT


def _convert():
  spec = importlib.util.spec_from_file_location("convert_to_hf", ROOT / "tools" / "convert_to_hf.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def workdir(tmp_path):
  """Enough of a work dir for the tools to accept it as their source (nothing in it is loaded)."""
  w = tmp_path / "run"
  (w / "tokenizer").mkdir(parents=True)
  (w / "checkpoints").mkdir()
  (w / "config.json").write_text("{}")
  (w / "run.json").write_text("{}")
  return w


def test_export_refuses_non_empty_folders_and_work_dirs(tmp_path, workdir, capsys):
  convert = _convert()
  other = tmp_path / "other_model"
  other.mkdir()
  (other / "model.safetensors.index.json").write_text("{}")
  second = tmp_path / "second_run"
  shutil_copy = __import__("shutil").copytree
  shutil_copy(workdir, second)
  cases = [
      ([str(workdir), str(other)], "is not empty; choose a new folder, or pass --overwrite"),
      ([str(workdir), str(workdir)], "is, holds or lies inside the source"),
      ([str(workdir), str(workdir / "export")], "is, holds or lies inside the source"),
      ([str(workdir), str(second), "--overwrite"], "is the jaxreward work dir"),
      ([str(workdir), str(second / "hf"), "--overwrite"], "lies inside the jaxreward work dir"),
      ([str(workdir), str(tmp_path), "--overwrite"], "is, holds or lies inside the source"),
      ([str(workdir), str(workdir / "config.json")], "is a file; expected a folder"),
  ]
  for argv, message in cases:
    before = sorted(os.walk(tmp_path))
    assert convert.main(argv) == configuration.EXIT_BAD_INPUT, argv
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(os.walk(tmp_path)) == before


def test_overwrite_replaces_the_folder_whole(tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "model-00001-of-00002.safetensors").write_text("old shard")
  outputs.check_folder(str(out), overwrite=True)
  with pytest.raises(RuntimeError):
    with outputs.replaced_folder(str(out)) as partial:
      (open(os.path.join(partial, "config.json"), "w")).close()
      raise RuntimeError("export failed halfway")
  assert os.listdir(out) == ["model-00001-of-00002.safetensors"]  # A failed export leaves the old one.
  with outputs.replaced_folder(str(out)) as partial:
    assert os.path.dirname(partial) == str(tmp_path) and not os.path.exists(os.path.join(partial, "x"))
    with open(os.path.join(partial, "config.json"), "w") as f:
      f.write("{}")
  assert os.listdir(out) == ["config.json"] and os.listdir(tmp_path) == ["hf"]


def test_score_out_is_checked_before_loading(tmp_path, workdir, capsys):
  rows = tmp_path / "rows.jsonl"
  rows.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
  (tmp_path / "file").write_text("x")
  for out, message in [(tmp_path, "is a folder; expected a file path"),
                       (tmp_path / "file" / "scored.jsonl", "is a file, not a folder"),
                       (rows, "is the --data file")]:
    assert score_cmd.main(["--model", str(workdir), "--data", str(rows), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err
  assert rows.read_text().startswith("{")
