"""What a run leaves in its work dir for people: metrics.jsonl, metrics.json, learning curves, model card."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


class MetricsLog:
  """Append-only metrics.jsonl; on resume, rows past the restored step are dropped (they were never saved)."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool, scalars_writer=None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.scalars_writer = scalars_writer  # e.g. tensorboard.Writer: the same rows as TensorBoard scalars.
    self.rows = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.rows = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= resume_step]
    if enabled:
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.rows)

  def write(self, row: dict) -> None:
    self.rows.append(row)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if self.scalars_writer is not None:
      self.scalars_writer.scalars(row["step"], {f"{row['kind']}/{k}": v for k, v in row.items()
                                                if k not in ("kind", "step")})

  def close(self) -> None:
    if self.scalars_writer is not None:
      self.scalars_writer.close()

  def evals(self) -> list[dict]:
    return [r for r in self.rows if r["kind"] == "eval"]


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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


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
