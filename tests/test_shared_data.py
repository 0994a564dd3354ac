"""Every real preference file in ../shared/data loads, passes configs/small.py, and trains with configs/tiny.py.

Skipped with a reason when ../shared/data is absent (it is not part of the project). Only the data path
changes between the configs and these runs, plus train.num_steps (a few steps prove the file trains; the
full run is a benchmark, not a test), a compilation cache shared by the runs (it changes no result), and for
the training runs only, the first TRAIN_LINES lines of the larger files: evaluating 2,700 ETHICS validation
pairs would cost more than the steps (the whole files are loaded and prepared by the tests above).
"""

import functools
import json

import numpy as np
import pytest

from conftest import SHARED_DATA, load_config, require_shared_data
from jaxreward import configuration, corpus, data

TRAIN_LINES = 1500
FILES = sorted(p.name for p in SHARED_DATA.glob("*.jsonl")) if SHARED_DATA.is_dir() else ["(absent)"]


def test_every_file_is_covered():
  shared = require_shared_data()
  # A new file in ../shared/data must not slip past these tests under another extension.
  others = [p.name for p in shared.iterdir() if p.is_file() and p.suffix not in (".jsonl", ".md")]
  assert not others, f"files not covered by test_shared_data.py: {others}"
  assert len(FILES) >= 8


@pytest.mark.parametrize("name", FILES)
def test_file_loads_every_line(name):
  path = require_shared_data() / name
  pairs, report = data.load_pairs(str(path))
  with open(path, "rb") as f:
    assert report.lines == report.pairs == len(pairs) == sum(1 for line in f if line.strip())
  assert report.skipped == 0 and len(report.formats) == 1


@functools.cache
def prepared_with_small_config(name):
  """configs/small.py on a whole file, prepared once: tokenizing ETHICS's 13,738 pairs (and training a BPE on
  them) is most of these tests' time, and the packing test below reads the same corpus."""
  config = load_config("small")
  config.data.train_path = str(require_shared_data() / name)
  configuration.validate(config)
  return config, corpus.prepare(config, lambda message: None)


@pytest.mark.parametrize("name", FILES)
def test_small_config_accepts_file_by_changing_only_the_path(name):
  config, prepared = prepared_with_small_config(name)
  s = prepared.stats
  assert len(prepared.train) >= config.train.batch_size and len(prepared.validation) > 0
  assert s["dropped_pairs"] == 0  # keep_end keeps every pair; truncation only shortens prompts first.
  assert s["train_pairs"] + s["val_pairs"] + s["duplicates_removed"] == data.load_pairs(
      config.data.train_path)[1].pairs - s["leaks_removed"]
  eos = prepared.tokenizer.eos_token_id
  assert all(side[-1] == eos and len(side) <= config.data.max_length
             for ids in prepared.train.ids[:200] for side in ids)


@pytest.mark.parametrize("name", FILES)
def test_tiny_trains_a_few_steps(name, tmp_path, tmp_path_factory):
  from jaxreward import train  # pylint: disable=g-import-not-at-top
  config = load_config("tiny")
  with open(require_shared_data() / name, "rb") as f:
    head = b"".join(line for _, line in zip(range(TRAIN_LINES), f))
  (tmp_path / name).write_bytes(head)
  config.data.train_path = str(tmp_path / name)
  config.mesh.data = 1
  config.train.num_steps = 2
  config.train.compilation_cache = str(tmp_path_factory.getbasetemp() / "xla_cache")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["training_steps"] == 2 and np.isfinite(summary["val_loss"])
  with open(tmp_path / "run" / "metrics.json") as f:
    metrics = json.load(f)
  # The truncation and hygiene counts reach metrics.json.
  for key in ("truncated_pairs", "dropped_pairs", "duplicates_removed", "bad_lines_skipped"):
    assert key in metrics


def test_packing_keeps_padding_under_15_percent_on_ethics():
  from jaxreward import pipeline  # pylint: disable=g-import-not-at-top
  config, prepared = prepared_with_small_config("ethics_util_train.jsonl")
  config = config.copy_and_resolve_references()  # The cached config stays as prepared.
  plan = pipeline.make_plan(config, prepared.train)
  layout, _ = pipeline.make_layout(config, plan, 1, prepared.tokenizer.pad_token_id)
  packed = [plan.padding_fraction(epoch, layout) for epoch in range(3)]
  assert max(packed) < 0.15, packed
  config.data.packing = False
  sorted_plan = pipeline.make_plan(config, prepared.train)
  bucketed, _ = pipeline.make_layout(config, sorted_plan, 1, prepared.tokenizer.pad_token_id)
  assert sorted_plan.padding_fraction(0, bucketed) > 2 * max(packed)
