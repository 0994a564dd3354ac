"""Scoring fixed sets of pairs with a jitted, sharded step: validation and the training-sample check."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreward import loss, sharding


def make_eval_step(graphdef, params_shardings, mesh, rule_table):
  """(params, batch) -> (sums, r_Bx2, weight_B), replicated so every host reads the global batch's values."""

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    r_Bx2 = model.score_pairs(batch["tokens_BxPxL"], batch["lengths_BxP"])
    return loss.batch_sums(r_Bx2, batch["weight_B"], batch["margin_B"]), r_Bx2, batch["weight_B"]

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings(mesh, rule_table)),
                 out_shardings=replicated)


BUCKETED_KEYS = ("tokens_BxPxL", "lengths_BxP", "weight_B", "margin_B")


def batch_shardings(mesh, rule_table, keys=BUCKETED_KEYS) -> dict:
  """Leading axis over the batch shards; the shape letters after the last '_' give each array's rank."""
  return {k: sharding.batch_sharding(mesh, rule_table, k.rsplit("_", 1)[1].count("x") + 1) for k in keys}


def to_device(batch: dict, shardings: dict) -> dict:
  """Each host contributes its rows; together they form the global batch."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def run(eval_step, params, batches: list[dict], shardings: dict) -> tuple[dict, np.ndarray]:
  """Means over all real pairs, and the [num_real_pairs, 2] rewards in batch order."""
  total, rewards = None, []
  pending = None
  for batch in batches:
    out = eval_step(params, to_device(batch, shardings))
    if pending is not None:  # Fetch one batch late so the device never waits for the host.
      total, rewards = _accumulate(total, rewards, pending)
    pending = out
  if pending is not None:
    total, rewards = _accumulate(total, rewards, pending)
  return loss.finalize(total), np.concatenate(rewards) if rewards else np.zeros((0, 2), np.float32)


def _accumulate(total, rewards, out):
  sums, r_Bx2, weight_B = jax.device_get(out)
  total = sums if total is None else {k: total[k] + sums[k] for k in total}
  rewards.append(np.asarray(r_Bx2)[np.asarray(weight_B) > 0])
  return total, rewards


# ---------------------------------------------------------------------------------------------------------------
# Command line: error analysis of a trained model on a preference file.
#   python -m jaxreward.evaluate --workdir W --data FILE [--checkpoint best|latest|STEP] [--out DIR]
# W is a jaxreward work dir (scored with the sharded eval step above) or an exported HF folder (scored by
# jaxreward.score's HF path). Writes report.json, summary.txt and reliability.png to DIR (default
# W/eval/<data file name>).
# ---------------------------------------------------------------------------------------------------------------


def score_workdir(workdir: str, checkpoint, data_path: str):
  """(encoded pairs, r_Nx2 in pair order, eval-step means, meta) for a work dir at a checkpoint."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxreward import artifacts, data, pipeline  # pylint: disable=g-import-not-at-top
  from jaxreward.configuration import ConfigError  # pylint: disable=g-import-not-at-top
  config = artifacts.read_config(workdir)
  d = config.data
  pairs, load_report = data.load_pairs(data_path, d.format, d.on_bad_line)
  mesh_cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "rules": config.mesh.rules})
  loaded = artifacts.load(workdir, checkpoint, mesh_cfg)
  enc = pipeline.encode(pairs, loaded.tokenizer, d.max_length, d.truncation)
  if not len(enc):
    raise ConfigError(f"{data_path}: no pair left after truncation ({d.truncation}, max_length {d.max_length})")
  mesh, rule_table = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
  graphdef, params = nnx.split(loaded.model, nnx.Param)
  params_shardings = jax.tree.map(lambda x: x.sharding, params)
  eval_step = make_eval_step(graphdef, params_shardings, mesh, rule_table)
  # The eval batch must split over the data axis; round the configured size up to a multiple of it.
  data_size = mesh.shape["data"]
  batch_size = -(-config.train.eval_batch_size // data_size) * data_size
  batches = pipeline.eval_batches(enc, np.arange(len(enc)), batch_size,
                                  pipeline.bucket_lengths(d.max_length, d.num_buckets), loaded.tokenizer.pad_token_id,
                                  jax.process_index(), jax.process_count())
  means, r_Nx2 = run(eval_step, params, batches, batch_shardings(mesh, rule_table))
  from jaxreward import analysis  # pylint: disable=g-import-not-at-top
  r_Nx2 = analysis.to_pair_order(r_Nx2, enc.lengths())
  meta = {"model": workdir, "kind": "workdir", "checkpoint_step": loaded.step, "backend": "jax (sharded eval step)",
          "mesh": sharding.describe(mesh), "lines_read": load_report.lines, "bad_lines_skipped": load_report.skipped,
          "max_length": d.max_length, "truncation": d.truncation}
  return enc, r_Nx2, means, meta


def score_hf_folder(folder: str, data_path: str):
  """The same for an exported HF folder, through jaxreward.score (JAX via jaxreward.hf, else torch)."""
  from jaxreward import data, pipeline, score  # pylint: disable=g-import-not-at-top
  from jaxreward.configuration import ConfigError  # pylint: disable=g-import-not-at-top
  pairs, load_report = data.load_pairs(data_path)
  scorer = score.load_scorer(folder)
  enc = pipeline.encode(pairs, scorer.tokenizer, scorer.max_length, "keep_end")
  if not len(enc):
    raise ConfigError(f"{data_path}: no pair to score")
  r = scorer.score_ids([sides[0] for sides in enc.ids] + [sides[1] for sides in enc.ids])
  r_Nx2 = np.stack([r[:len(enc)], r[len(enc):]], axis=1)
  meta = {"model": folder, "kind": "hf", "backend": scorer.description, "lines_read": load_report.lines,
          "bad_lines_skipped": load_report.skipped, "max_length": scorer.max_length, "truncation": "keep_end"}
  return enc, r_Nx2, None, meta


def evaluate_file(model_path: str, data_path: str, checkpoint="best", out_dir: str | None = None) -> dict:
  """Scores `data_path`, analyses it, writes report.json + summary.txt + reliability.png; returns the report."""
  import os  # pylint: disable=g-import-not-at-top
  from jaxreward import analysis, report as report_lib, score  # pylint: disable=g-import-not-at-top
  from jaxreward.configuration import ConfigError  # pylint: disable=g-import-not-at-top
  kind = score.check_model_path(model_path)
  if not os.path.isfile(data_path):
    raise ConfigError(f"{data_path}: no such file")
  if kind == "hf":
    enc, r_Nx2, means, meta = score_hf_folder(model_path, data_path)
  else:
    enc, r_Nx2, means, meta = score_workdir(model_path, checkpoint, data_path)
  name = os.path.basename(data_path).split(".")[0] or "data"
  out_dir = out_dir or os.path.join(model_path, "eval", name)
  meta.update(data=data_path, pairs_scored=len(enc), truncated_pairs=enc.truncated, dropped_pairs=enc.dropped)
  if means is not None:
    meta["eval_step_loss"], meta["eval_step_accuracy"] = means["loss"], means["accuracy"]
  plot = os.path.join(out_dir, "reliability.png")
  result = analysis.analyze(enc.pairs, r_Nx2, enc.lengths(), enc.margin, plot_path=plot if jax.process_index() == 0
                            else None, title=f"{os.path.basename(os.path.normpath(model_path))} on {name}")
  result["meta"] = meta
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    report_lib.write_json(os.path.join(out_dir, "report.json"), result)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
      f.write(summary_text(result))
  result["out_dir"] = out_dir
  return result


def summary_text(result: dict) -> str:
  from jaxreward import analysis  # pylint: disable=g-import-not-at-top
  m = result["meta"]
  step = f" at step {m['checkpoint_step']}" if "checkpoint_step" in m else ""
  head = [f"model: {m['model']}{step} [{m['backend']}]",
          f"data: {m['data']} ({m['pairs_scored']} pairs scored of {m['lines_read']} lines; {m['bad_lines_skipped']} "
          f"bad lines skipped; {m['truncated_pairs']} truncated, {m['dropped_pairs']} dropped at max_length "
          f"{m['max_length']})", ""]
  return "\n".join(head) + analysis.render_text(result)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from jaxreward import configuration  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m jaxreward.evaluate",
                                   description="Error analysis of a reward model on a preference file.")
  parser.add_argument("--workdir", required=True, help="a jaxreward work dir or an exported HF folder")
  parser.add_argument("--data", required=True, help="preference pairs (explicit, implicit or conversational)")
  parser.add_argument("--checkpoint", default="best", help="best | latest | STEP (work dir only)")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/<data name>)")
  args = parser.parse_args(argv)
  try:
    if args.checkpoint not in ("best", "latest") and not args.checkpoint.isdigit():
      raise configuration.ConfigError(f"--checkpoint must be best, latest or a step number, got {args.checkpoint!r}")
    result = evaluate_file(args.workdir, args.data, args.checkpoint, args.out)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return configuration.EXIT_BAD_INPUT
  if jax.process_index() == 0:
    print(summary_text(result), end="")
    print(f"wrote {result['out_dir']}/report.json, summary.txt, reliability.png")
  return configuration.EXIT_OK


if __name__ == "__main__":
  raise SystemExit(main())
