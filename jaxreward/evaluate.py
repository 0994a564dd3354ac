"""Error analysis of a trained model on a preference file: score every pair, analyse, write the report.

`evaluate_file(model, data)` scores a jaxreward work dir with the sharded eval step (state.py) on all of this
host's devices, or an exported HF folder through score.py's scorer (JAX via hf.py, else torch), then writes
report.json, summary.txt and reliability.png (analysis.py) to the output folder. The command line is
`jaxreward.commands.evaluate`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from jaxreward import analysis, artifacts, data, hosts, pipeline, report, score, sharding, state, storage
from jaxreward import tokenizer as tokenizer_lib
from jaxreward.configuration import ConfigError


def score_workdir(workdir: str, checkpoint, data_path: str):
  """(encoded pairs, r_Nx2 in pair order, eval-step means, meta) for a work dir at a checkpoint."""
  config = artifacts.read_config(workdir)
  d = config.data
  pairs, load_report = data.load_pairs(data_path, d.format, d.on_bad_line)
  mesh_cfg = sharding.host_mesh_config(config.mesh.rules)
  loaded = artifacts.load(workdir, checkpoint, mesh_cfg)
  enc = tokenizer_lib.encode(pairs, loaded.tokenizer, d.max_length, d.truncation)
  if not len(enc):
    raise ConfigError(f"{data_path}: no pair left after truncation ({d.truncation}, max_length {d.max_length})")
  mesh, rule_table = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
  graphdef, params = nnx.split(loaded.model, nnx.Param)
  eval_step = state.make_eval_step(graphdef, jax.tree.map(lambda x: x.sharding, params), mesh, rule_table)
  # The eval batch must split over the data axis; round the configured size up to a multiple of it.
  data_size = mesh.shape["data"]
  batch_size = -(-config.train.eval_batch_size // data_size) * data_size
  evaluation = pipeline.eval_batches(enc, np.arange(len(enc)), batch_size,
                                     pipeline.bucket_lengths(d.max_length, d.num_buckets),
                                     loaded.tokenizer.pad_token_id, pipeline.Batch.sharding(mesh, rule_table))
  means, r_Nx2 = state.evaluate(eval_step, params, evaluation, pipeline.Batch.sharding(mesh, rule_table))
  meta = {"model": workdir, "kind": "workdir", "checkpoint_step": loaded.step, "backend": "jax (sharded eval step)",
          "mesh": sharding.describe(mesh), "lines_read": load_report.lines, "bad_lines_skipped": load_report.skipped,
          "max_length": d.max_length, "truncation": d.truncation}
  return enc, r_Nx2, means, meta


def score_hf_folder(folder: str, data_path: str):
  """The same for an exported HF folder, through score.py's scorer."""
  pairs, load_report = data.load_pairs(data_path)
  scorer = score.load_scorer(folder)
  enc = tokenizer_lib.encode(pairs, scorer.tokenizer, scorer.max_length, "keep_end")
  if not len(enc):
    raise ConfigError(f"{data_path}: no pair to score")
  r = scorer.score_ids([sides[0] for sides in enc.ids] + [sides[1] for sides in enc.ids])
  r_Nx2 = np.stack([r[:len(enc)], r[len(enc):]], axis=1)
  meta = {"model": folder, "kind": "hf", "backend": scorer.description, "lines_read": load_report.lines,
          "bad_lines_skipped": load_report.skipped, "max_length": scorer.max_length, "truncation": "keep_end"}
  return enc, r_Nx2, None, meta


def evaluate_file(model_path: str, data_path: str, checkpoint="best", out_dir: str | None = None) -> dict:
  """Scores `data_path`, analyses it, writes report.json + summary.txt + reliability.png; returns the report."""
  kind = score.check_model_path(model_path)
  if not os.path.isfile(data_path):
    raise ConfigError(f"{data_path}: no such file")
  if kind == "hf":
    enc, r_Nx2, means, meta = score_hf_folder(model_path, data_path)
  else:
    enc, r_Nx2, means, meta = score_workdir(model_path, checkpoint, data_path)
  name = os.path.basename(data_path).split(".")[0] or "data"
  out_dir = out_dir or storage.join(model_path, "eval", name)
  meta.update(data=data_path, pairs_scored=len(enc), truncated_pairs=enc.truncated, dropped_pairs=enc.dropped)
  if means is not None:
    meta["eval_step_loss"], meta["eval_step_accuracy"] = means["loss"], means["accuracy"]
  plot = storage.join(out_dir, "reliability.png")
  result = analysis.analyze(enc.pairs, r_Nx2, enc.lengths(), enc.margin, plot_path=plot if hosts.is_main()
                            else None, title=f"{os.path.basename(os.path.normpath(model_path))} on {name}")
  result["meta"] = meta
  if hosts.is_main():
    report.write_json(storage.join(out_dir, "report.json"), result)
    storage.write_atomically(storage.join(out_dir, "summary.txt"), summary_text(result))
  result["out_dir"] = out_dir
  return result


def summary_text(result: dict) -> str:
  m = result["meta"]
  step = f" at step {m['checkpoint_step']}" if "checkpoint_step" in m else ""
  head = [f"model: {m['model']}{step} [{m['backend']}]",
          f"data: {m['data']} ({m['pairs_scored']} pairs scored of {m['lines_read']} lines; {m['bad_lines_skipped']} "
          f"bad lines skipped; {m['truncated_pairs']} truncated, {m['dropped_pairs']} dropped at max_length "
          f"{m['max_length']})", ""]
  return "\n".join(head) + report.analysis_text(result)


if __name__ == "__main__":
  # `python -m jaxreward.evaluate` predates jaxreward.commands; runpy keeps it working without an import cycle.
  import runpy  # pylint: disable=g-import-not-at-top
  runpy.run_module("jaxreward.commands.evaluate", run_name="__main__", alter_sys=True)
