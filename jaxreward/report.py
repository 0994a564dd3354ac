"""What a run leaves in its work dir for people: metrics.jsonl, metrics.json, learning curves, model card.

`finish` is the post-run report: the gate's verdict on the best checkpoint, the error analysis of its
validation rewards, metrics.json, learning_curves.png and the README.md model card.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
import time

import matplotlib

from jaxreward import analysis, gate, hosts, storage
from jaxreward.configuration import ConfigError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def summary_writer(logdir: str):
  """A tensorboardX SummaryWriter, imported without torch: tensorboardX imports torch (seconds of start-up
  on every run, every host) only to accept torch tensors, and we log Python floats."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which tensorboardX expects.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter(logdir)


class MetricsLog:
  """Append-only metrics.jsonl, and the same rows as TensorBoard scalars (`<kind>/<key>`, tensorboardX event
  files in the work dir; a resumed run starts a new file, which TensorBoard merges by step). On resume, rows
  past the restored step are dropped from metrics.jsonl (they were never saved).

  A remote work dir (storage.py) has no append: metrics.jsonl is rewritten whole, in one upload, and tensorboardX
  writes its event file to a local temporary folder that is copied up. Both go up on each eval row, at most
  every REMOTE_FLUSH_S seconds otherwise, at `flush()` (before every checkpoint, so a resume never finds a
  checkpoint past the rows) and at close: per-row uploads of a growing file would cost O(rows²) bytes.

  Only the enabled log (host 0's) reads and rewrites the file; with several hosts the others then receive its
  rows (a collective, so after the rewrite) instead of reading a file that host 0 may be rewriting."""

  REMOTE_FLUSH_S = 60.0

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.path = storage.join(workdir, "metrics.jsonl")
    self.enabled, self.workdir = enabled, workdir
    self.remote = storage.is_remote(workdir)
    self.events_dir = (tempfile.mkdtemp(prefix="jaxreward-events-") if self.remote else workdir) if enabled else None
    self.events = summary_writer(self.events_dir) if enabled else None
    self.rows = self._resume(resume_step) if enabled else []
    self.unflushed, self.flushed_at = False, time.monotonic()
    if hosts.several():
      self.rows = json.loads(hosts.from_main(json.dumps(self.rows).encode() if hosts.is_main() else None))

  def _resume(self, resume_step: int) -> list[dict]:
    rows = []
    if storage.isfile(self.path):
      lines = [line for line in storage.read_text(self.path).splitlines() if line.strip()]
      for n, line in enumerate(lines):
        try:
          row = json.loads(line)
        except ValueError:
          if n == len(lines) - 1:
            break  # A write cut short by a crash: past the last checkpoint, like every row after it.
          raise ConfigError(f"{self.path}:{n + 1}: not a JSON row; move the file away to resume") from None
        if row["step"] <= resume_step:
          rows.append(row)
    storage.write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows

  def write(self, row: dict) -> None:
    self.rows.append(row)
    if self.enabled and not self.remote:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if self.events is not None:
      for key, value in row.items():
        # Only finite numbers are scalars: None (e.g. no interval loss yet), lists and NaN are left out.
        if key not in ("kind", "step") and is_scalar(value):
          self.events.add_scalar(f"{row['kind']}/{key}", float(value), row["step"])
      self.events.flush()  # Rows come every log_every steps: a live TensorBoard sees each at once.
    self.unflushed = self.enabled and self.remote
    if row["kind"] == "eval" or time.monotonic() - self.flushed_at >= self.REMOTE_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    """Uploads a remote work dir's metrics.jsonl and event files if rows came since the last upload."""
    if not self.unflushed:
      return
    storage.write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
    if self.events is not None:
      storage.upload_folder(self.events_dir, self.workdir)
    self.unflushed, self.flushed_at = False, time.monotonic()

  def close(self) -> None:
    self.flush()
    if self.events is not None:
      self.events.close()
      self.events = None
      if self.remote:
        storage.upload_folder(self.events_dir, self.workdir)
        shutil.rmtree(self.events_dir, ignore_errors=True)

  def evals(self) -> list[dict]:
    return [r for r in self.rows if r["kind"] == "eval"]


def is_scalar(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finish(workdir: str, config, history: MetricsLog, best_step: int, best_rewards, validation, facts: dict,
           is_main: bool) -> dict:
  """The summary of a finished run (written to metrics.json by the main process), the gate printed on stdout.

  best_rewards: the best checkpoint's [N, 2] rewards on `validation` (a `tokenizer.Encoded`), in pair order.
  facts: what the run measured beside the eval rows (parameters, steps, padding, mesh, wall time, data stats).
  """
  evals = history.evals()
  best = next(r for r in evals if r["step"] == best_step)
  verdict = gate.judge(best, [r["interval_train_loss"] for r in evals if r["interval_train_loss"] is not None],
                       config.gate)
  # Error analysis of the best checkpoint on the validation split: baselines, length bias, calibration.
  validation_analysis = analysis.for_training(
      validation, best_rewards, storage.join(workdir, "reliability.png") if is_main else None)
  warning = analysis.length_warning(validation_analysis)
  if warning:
    verdict["warnings"] = [warning]
  summary = {
      "train_accuracy": best["train_accuracy"], "val_accuracy": best["val_accuracy"],
      "overfitting_gap": best["overfitting_gap"], "val_loss": best["val_loss"], "train_loss": best["train_loss"],
      "val_reward_mean": best["val_reward_mean"], "val_reward_std": best["val_reward_std"],
      "best_step": best_step, "random_baseline_accuracy": 0.5, **facts,
      "gate": verdict, "gate_pass": verdict["pass"], "validation_analysis": validation_analysis,
  }
  gate_text = gate.render(verdict)
  if is_main:
    write_json(storage.join(workdir, "metrics.json"), summary)
    plot_curves(history.rows, storage.join(workdir, "learning_curves.png"))
    storage.write_atomically(storage.join(workdir, "README.md"),
                             model_card(summary, config, gate_text, analysis_markdown(validation_analysis)))
    print(gate_text, flush=True)
  return summary


def plot_curves(rows: list[dict], path: str) -> None:
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (running)", alpha=0.6)
  ax_loss.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train sample")
  ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", label="validation")
  ax_loss.set(xlabel="step", ylabel="Bradley-Terry loss", title="Loss")
  ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train (running)", alpha=0.6)
  ax_acc.plot([r["step"] for r in evals], [r["train_accuracy"] for r in evals], "o-", label="train sample")
  ax_acc.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "s-", label="validation")
  ax_acc.axhline(0.5, color="grey", linestyle=":", label="random")
  ax_acc.set(xlabel="step", ylabel="pairwise accuracy", title="Accuracy", ylim=(0.0, 1.02))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  storage.write_atomically(path, png.getvalue())


def write_json(path: str, obj) -> None:
  storage.write_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def model_card(summary: dict, config, gate_text: str, analysis_markdown: str = "") -> str:
  m, t, d = config.model, config.train, config.data
  s = summary
  arch = (f"Llama-family decoder, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / "
          f"{m.num_kv_heads} KV heads, SwiGLU {m.mlp_dim}, RoPE θ={m.rope_theta}, vocab {s['vocab_size']}, "
          f"{'tied' if m.tie_embeddings else 'untied'} embeddings; linear reward head on the final EOS token")
  if m.init_from:
    arch = f"initialised from `{m.init_from}`; " + arch
  lines = [
      "# Reward model card (jaxreward)", "",
      "A Bradley-Terry reward model: `r(prompt, response)` is a scalar; P(chosen ≻ rejected) = σ(r_c − r_r).", "",
      "## Architecture", "", f"- {arch}", f"- parameters: {s['num_parameters']:,}",
      f"- compute dtype {m.dtype}, parameter dtype {m.param_dtype}", "",
      "## Data", "",
      f"- source: `{d.train_path or 'embedded synthetic task (jaxreward.synthetic)'}`"
      + (f", validation `{d.validation_path}`" if d.validation_path else
         f", {d.validation_fraction:.0%} of prompts held out"),
      f"- pairs: {s['train_pairs']:,} train, {s['val_pairs']:,} validation; "
      f"{s['duplicates_removed']} duplicates and {s['leaks_removed']} prompt leaks removed, "
      f"{s['bad_lines_skipped']} bad lines skipped",
      f"- max length {d.max_length} tokens ({d.truncation}): {s['truncated_pairs']} pairs truncated, "
      f"{s['dropped_pairs']} dropped; padding {s['padding_fraction']:.1%} of training token slots "
      f"({'sequences packed into rows' if s.get('packing') else 'length buckets'}; by epoch: "
      f"{', '.join(f'{p:.1%}' for p in s.get('padding_fraction_by_epoch', []))})", "",
      "## Training", "",
      f"- {s['training_steps']} steps of batch {t.batch_size} pairs, AdamW lr {t.learning_rate} "
      f"({t.warmup_steps} warmup, {t.schedule} decay), weight decay {t.weight_decay}, clip {t.grad_clip_norm}, "
      f"seed {t.seed}",
      f"- mesh {s['mesh']}; wall time {s['wall_time_s']:.0f} s", "",
      *_forced_resumes(s.get("forced_resumes")),
      "## Results (best checkpoint by validation accuracy)", "",
      "| metric | value |", "|---|---|",
      f"| best step | {s['best_step']} |",
      f"| validation accuracy | {s['val_accuracy']:.4f} |",
      f"| train accuracy (fixed sample) | {s['train_accuracy']:.4f} |",
      f"| overfitting gap | {s['overfitting_gap']:+.4f} |",
      f"| validation loss | {s['val_loss']:.4f} |",
      f"| random baseline | {s['random_baseline_accuracy']:.2f} |",
      f"| validation reward mean / std | {s['val_reward_mean']:.3f} / {s['val_reward_std']:.3f} |", "",
      "```", gate_text, "```", "",
      analysis_markdown, "",
      "## How to load", "",
      "The work dir holds `checkpoints/` (orbax; best and latest steps), `tokenizer/` (HF) and `config.json`.",
      "```python",
      "from jaxreward.score import load_scorer",
      "score = load_scorer(\"<this work dir>\")  # best checkpoint",
      "rewards = score([\"prompt\"], [\"response\"])",
      "```", "",
  ]
  return "\n".join(lines)


def _forced_resumes(forced) -> list[str]:
  """Card lines for resumes forced past a changed setting or file (`train.resume=force`, rundir.py)."""
  if not forced:
    return []
  lines = ["## Forced resumes", "",
           "This run was continued by force under other settings or files than it started with: the steps before "
           "each resume were trained under the earlier ones, so the results below describe neither alone.", ""]
  for f in forced:
    lines.append(f"- at step {f['step']} ({f['at']}): " + "; ".join(f["differences"]))
  return lines + [""]


# ---------------------------------------------------------------------------------------------------------------
# Error analysis (analysis.py) as text and markdown
# ---------------------------------------------------------------------------------------------------------------


def _f(x, spec=".4f"):
  return "n/a" if x is None else format(x, spec)


def analysis_text(report: dict, max_categories: int = 60) -> str:
  r, acc, lb = report, report["accuracy"], report["length_bias"]
  lines = [
      f"pairs: {r['num_pairs']}",
      f"accuracy: {acc['value']:.4f}  (95% CI {acc['ci95'][0]:.4f}–{acc['ci95'][1]:.4f}; {acc['correct']:g} right)",
      f"loss (Bradley-Terry): {r['loss']:.4f}",
      f"reward chosen:   mean {_f(r['rewards']['chosen']['mean'])}  std {_f(r['rewards']['chosen']['std'])}",
      f"reward rejected: mean {_f(r['rewards']['rejected']['mean'])}  std {_f(r['rewards']['rejected']['std'])}",
      "margin (chosen − rejected): mean {:.4f}  std {:.4f}  quantiles {}".format(
          r["margin"]["mean"], r["margin"]["std"],
          " ".join(f"{k}={v:+.3f}" for k, v in r["margin"]["quantiles"].items())),
      "", "baselines on the same pairs (ties count half):",
      f"  {'model':<24} {acc['value']:.4f}",
  ]
  lines += [f"  {k:<24} {v:.4f}" for k, v in r["baselines"].items()]
  lines += [f"  model − best length heuristic ({r['best_length_baseline']['name']}): "
            f"{r['vs_best_length_baseline']:+.4f}"]
  lines += ["", f"length bias (full response lengths in {lb['unit']}):"]
  for name in ("chosen_longer", "chosen_shorter", "equal_length"):
    lines.append(f"  accuracy when {name.replace('_', ' '):<15} {_f(lb[name]['accuracy'])}  (n={lb[name]['n']})")
  lines.append(f"  model prefers the longer response in {_f(lb['prefers_longer'], '.1%')} of unequal pairs; "
               f"corr(margin, length difference): Pearson {_f(lb['pearson'], '+.3f')}, "
               f"Spearman {_f(lb['spearman'], '+.3f')}")
  lbt = r.get("length_bias_tokens")
  if lbt:
    lines.append(f"  in tokens as scored (after truncation): accuracy {_f(lbt['chosen_longer']['accuracy'])} chosen "
                 f"longer (n={lbt['chosen_longer']['n']}) / {_f(lbt['chosen_shorter']['accuracy'])} shorter "
                 f"(n={lbt['chosen_shorter']['n']}) / {_f(lbt['equal_length']['accuracy'])} equal "
                 f"(n={lbt['equal_length']['n']}); Pearson {_f(lbt['pearson'], '+.3f')}")
  cal = r["calibration"]
  lines += ["", f"calibration: ECE {_f(cal['ece'])} (10 bins of max(σ(margin), 1 − σ(margin)); "
            f"mean confidence {_f(cal['mean_confidence'])})"]
  for b in cal["bins"]:
    if b["n"]:
      lines.append(f"  [{b['lo']:.2f}, {b['hi']:.2f}) n={b['n']:<5} confidence {b['confidence']:.3f} "
                   f"accuracy {b['accuracy']:.3f}")
  for field, cats in r["by_category"].items():
    shown = [(k, v) for k, v in cats.items() if v["n"] >= analysis.MIN_CATEGORY_SHOWN][:max_categories]
    lines += ["", f"accuracy by {field} ({len(cats)} values; {len(shown)} with ≥{analysis.MIN_CATEGORY_SHOWN} pairs shown, "
              "worst first):"]
    for k, v in sorted(shown, key=lambda kv: kv[1]["accuracy"]):
      lines.append(f"  {k[:40]:<40} n={v['n']:<4} accuracy {v['accuracy']:.3f} "
                   f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]  longer-wins {v['longer_wins']:.3f}")
  if r["hardest"]:
    lines += ["", "most confident mistakes:"]
    for h in r["hardest"]:
      cat = f" [{h['category']}]" if "category" in h else ""
      lines += [f"  #{h['index']} {h['where']}{cat} margin {h['margin']:+.3f} (P(chosen) {h['p_chosen']:.3f})",
                f"    prompt:   {h['prompt']}", f"    chosen:   {h['chosen']}", f"    rejected: {h['rejected']}"]
  warning = analysis.length_warning(r)
  if warning:
    lines += ["", "WARNING " + warning]
  return "\n".join(lines) + "\n"


def analysis_markdown(report: dict, max_categories: int = 15) -> str:
  """A model-card section: baselines, length bias, calibration, weakest categories."""
  r, acc, lb, cal = report, report["accuracy"], report["length_bias"], report["calibration"]
  lines = [
      "## Error analysis", "",
      f"{r['num_pairs']} pairs. Accuracy **{acc['value']:.4f}** (95% Wilson CI {acc['ci95'][0]:.4f}–"
      f"{acc['ci95'][1]:.4f}), Bradley-Terry loss {r['loss']:.4f}.", "",
      "| scorer | accuracy |", "|---|---|", f"| this model | {acc['value']:.4f} |",
  ]
  lines += [f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in r["baselines"].items()]
  lines += [
      "", f"Length bias (in {lb['unit']}): accuracy {_f(lb['chosen_longer']['accuracy'])} when the chosen "
      f"response is longer (n={lb['chosen_longer']['n']}) vs {_f(lb['chosen_shorter']['accuracy'])} when it is "
      f"shorter (n={lb['chosen_shorter']['n']}); the model prefers the longer response in "
      f"{_f(lb['prefers_longer'], '.1%')} of pairs; correlation of reward margin with length difference: "
      f"Pearson {_f(lb['pearson'], '+.3f')}, Spearman {_f(lb['spearman'], '+.3f')}.", "",
      f"Calibration: expected calibration error of σ(margin) {_f(cal['ece'])} (10 bins)"
      + (f"; reliability diagram `{r['reliability_plot']}`." if r.get("reliability_plot") else "."),
  ]
  for field, cats in r["by_category"].items():
    shown = sorted(((k, v) for k, v in cats.items() if v["n"] >= analysis.MIN_CATEGORY_SHOWN), key=lambda kv: kv[1]["accuracy"])
    if not shown:
      continue
    lines += ["", f"Weakest values of `{field}` (≥{analysis.MIN_CATEGORY_SHOWN} pairs):", "",
              "| value | pairs | accuracy | longer wins |", "|---|---|---|---|"]
    lines += [f"| {k.replace('|', '/')} | {v['n']} | {v['accuracy']:.3f} | {v['longer_wins']:.3f} |"
              for k, v in shown[:max_categories]]
  warning = analysis.length_warning(r)
  if warning:
    lines += ["", f"> **Warning** — {warning}"]
  return "\n".join(lines) + "\n"
