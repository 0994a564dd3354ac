"""Preference pairs as a TFDS dataset, written and read through array_record: no TensorFlow anywhere.

Layout (`FEATURES`), one example per pair:
  pair   Text   the pair as JSON in the explicit or conversational layout that `data.parse_row` reads back:
                {"prompt", "chosen", "rejected", "margin", ...extra fields such as "category"}. Implicit
                (HH-RLHF) transcripts are stored already split, so every format survives one way.
  where  Text   the `file:line` the pair came from, so messages about a row still name the source line.
  index  int64  the pair's position in its source file; array_record orders examples by key hash, and
                reading sorts by index to give back the file's order (de-duplication keeps the first copy).

Splits are "train" and, optionally, "validation" (without it the trainer splits train 80/20 by prompt).
Pairs are validated when the dataset is written (tools/jsonl_to_tfds.py uses `data.load_pairs`) and again
when read, so a dataset written by another tool with this layout is checked the same way as a JSONL file.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxreward import data, jsonfile
from jaxreward.configuration import ConfigError

DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _tfds():
  # Imported on use: tensorflow_datasets takes ~2 s to import and only TFDS runs need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def features():
  tfds = _tfds()
  return tfds.features.FeaturesDict({"pair": tfds.features.Text(), "where": tfds.features.Text(),
                                     "index": np.int64})


def pair_json(pair: data.Pair) -> str:
  row = dict(pair.extra)
  row.update(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected, margin=pair.margin)
  return json.dumps(row, ensure_ascii=False)


def write(name: str, data_dir: str, splits: dict) -> str:
  """Writes {split: [Pair]} as TFDS dataset `name` under data_dir; returns the version folder."""
  if not _NAME.match(name):
    raise ConfigError(f"tfds: dataset name {name!r} must be snake_case (a-z, 0-9, _), starting with a letter")
  tfds = _tfds()
  dataset_name = name

  class PreferencePairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Built per call and not registered: several datasets (and tests) can be written in one process."""
    name = dataset_name
    VERSION = tfds.core.Version(DATASET_VERSION)
    # No source file to look up checksums beside: without this TFDS imports importlib_resources (not a
    # dependency of ours) only to find out there is none.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features(),
                                   description="Preference pairs for jaxreward (see jaxreward/tfds_data.py).")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs):
      for i, pair in enumerate(pairs):
        yield i, {"pair": pair_json(pair), "where": pair.where, "index": i}

  tfds.disable_progress_bar()
  builder = PreferencePairs(data_dir=data_dir, file_format="array_record")
  # FORCE_REDOWNLOAD: converting again must replace the pairs, not silently keep an older conversion.
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return str(builder.data_dir)


def builder_dir(name: str, data_dir: str) -> str:
  """data_dir/name/version for "name" (newest version) or "name:version"."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, base)
  if not data_dir or not os.path.isdir(data_dir):
    raise ConfigError(f"tfds: data.tfds_data_dir={data_dir!r} is not a folder")
  if not base or not os.path.isdir(root):
    present = sorted(e for e in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, e)))
    raise ConfigError(f"tfds: no dataset {base!r} in {data_dir} (found: {', '.join(present) or 'nothing'})")
  versions = [v for v in os.listdir(root) if os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
  if version:
    if version not in versions:
      raise ConfigError(f"tfds: {root} has no prepared version {version} (found: {', '.join(versions) or 'none'})")
    return os.path.join(root, version)
  if not versions:
    raise ConfigError(f"tfds: {root} holds no prepared version (no */dataset_info.json)")
  return os.path.join(root, max(versions, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v))))


def read(name: str, data_dir: str, fmt: str = "auto", on_bad_line: str = "error"):
  """{split: ([Pair], LoadReport)} of the splits present (train is required)."""
  tfds = _tfds()
  path = builder_dir(name, data_dir)
  try:
    builder = tfds.builder_from_directory(path)
    present = set(builder.info.splits.keys())
  except Exception as e:  # TFDS raises many types for a folder it cannot read.
    raise ConfigError(f"tfds: cannot open {path} ({type(e).__name__}: {e})") from None
  if "train" not in present:
    raise ConfigError(f"tfds: {path} has no 'train' split (found: {', '.join(sorted(present))})")
  out = {}
  for split in SPLITS:
    if split not in present:
      continue
    try:
      source = builder.as_data_source(split=split)
      rows = [source[i] for i in range(len(source))]
    except Exception as e:  # A missing or corrupt array_record shard.
      raise ConfigError(f"tfds: cannot read split {split!r} of {path} ({type(e).__name__}: {e})") from None
    if rows and "pair" not in rows[0]:
      raise ConfigError(f"tfds: {path} has features {sorted(rows[0])}; expected 'pair' (see jaxreward/tfds_data.py)")
    rows.sort(key=lambda r: int(r.get("index", 0)))
    report, pairs = data.LoadReport(path=f"{path}[{split}]"), []
    for i, row in enumerate(rows):
      where = _text(row.get("where", b"")) or f"{name}[{split}][{i}]"
      report.lines += 1
      try:
        try:
          value = json.loads(_text(row["pair"]))
        except ValueError as e:
          raise jsonfile.BadLine(f"invalid JSON in feature 'pair' ({e})") from None
        pair, kind = data.parse_row(value, fmt)
      except jsonfile.BadLine as e:
        if on_bad_line == "error":
          raise ConfigError(f"data: tfds {where}: {e} (set data.on_bad_line=skip to skip such rows)") from None
        report.skipped += 1
        if len(report.skip_reasons) < data.SHOWN_SKIP_REASONS:
          report.skip_reasons.append(f"tfds {where}: {e}")
        continue
      pair.where = where
      report.formats[kind] += 1
      report.one_empty += not (data.response_text(pair.chosen).strip() and data.response_text(pair.rejected).strip())
      pairs.append(pair)
    if not pairs:
      raise ConfigError(f"tfds: split {split!r} of {path} holds no usable pair ({report.lines} rows)")
    report.pairs = len(pairs)
    out[split] = (pairs, report)
  return out


def _text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
