"""The quality gate: is the best checkpoint a reward model worth handing to the RL stage?

Criteria (thresholds from the config's `gate` section), judged on the best-by-validation checkpoint:
- train accuracy (on a fixed sample of training pairs, scored like validation) >= min_train_accuracy
- validation accuracy >= min_val_accuracy
- overfitting gap (train − validation accuracy) < max_gap
- loss converged: the mean training loss over the last evaluation interval changed, against the interval
  before it, by less than converged_abs_tol, or less than converged_rel_tol of that interval's loss or of
  the whole drop since the first interval.
"""

from __future__ import annotations

REMEDIES = {
    "train_accuracy": "the model does not fit its own data: train longer (train.num_epochs), raise "
                      "train.learning_rate, use a larger model, or check the labels and the truncation report",
    "val_accuracy": "it does not generalise: add or clean data, start from an SFT model (model.init_from), "
                    "or check that chosen/rejected are not swapped",
    "overfitting_gap": "it memorises: more data, fewer epochs, more train.weight_decay, or a smaller model",
    "loss_converged": "the loss is still moving: train for more steps (train.num_epochs / train.num_steps)",
}


def loss_converged(interval_losses: list[float], rel_tol: float, abs_tol: float) -> tuple[bool, str]:
  """The last interval moved the loss little: < abs_tol, or < rel_tol of the previous interval's loss, or
  < rel_tol of the whole drop since the first interval (a loss near zero halves cheaply; that is still a plateau)."""
  if len(interval_losses) < 2:
    return False, "fewer than two evaluation intervals"
  first, prev, last = interval_losses[0], interval_losses[-2], interval_losses[-1]
  change, total_drop = abs(last - prev), first - last
  ok = change < abs_tol or change < rel_tol * abs(prev) or change < rel_tol * total_drop
  return ok, (f"last interval {last:.4f} vs previous {prev:.4f} (change {change:.4f}; drop since the first "
              f"interval {total_drop:.4f})")


def judge(best: dict, interval_losses: list[float], gate_cfg) -> dict:
  """Verdict per criterion: {name: {"pass", "value", "threshold", "detail"}} plus "pass" overall."""
  gap = best["train_accuracy"] - best["val_accuracy"]
  converged, detail = loss_converged(interval_losses, gate_cfg.converged_rel_tol, gate_cfg.converged_abs_tol)
  criteria = {
      "train_accuracy": {"pass": best["train_accuracy"] >= gate_cfg.min_train_accuracy,
                         "value": best["train_accuracy"], "threshold": f">= {gate_cfg.min_train_accuracy}"},
      "val_accuracy": {"pass": best["val_accuracy"] >= gate_cfg.min_val_accuracy,
                       "value": best["val_accuracy"], "threshold": f">= {gate_cfg.min_val_accuracy}"},
      "overfitting_gap": {"pass": gap < gate_cfg.max_gap, "value": gap, "threshold": f"< {gate_cfg.max_gap}"},
      "loss_converged": {"pass": converged, "value": interval_losses[-1] if interval_losses else None,
                         "threshold": f"rel < {gate_cfg.converged_rel_tol} or abs < {gate_cfg.converged_abs_tol}",
                         "detail": detail},
  }
  for name, c in criteria.items():
    c["pass"] = bool(c["pass"])
    if not c["pass"]:
      c["remedy"] = REMEDIES[name]
  return {"pass": all(c["pass"] for c in criteria.values()), "criteria": criteria}


def render(verdict: dict) -> str:
  lines = [f"Quality gate: {'PASS' if verdict['pass'] else 'FAIL'}"]
  for name, c in verdict["criteria"].items():
    value = "n/a" if c["value"] is None else f"{c['value']:.4f}"
    line = f"  [{'pass' if c['pass'] else 'FAIL'}] {name} = {value} (needs {c['threshold']})"
    if c.get("detail"):
      line += f"; {c['detail']}"
    lines.append(line)
    if not c["pass"]:
      lines.append(f"         remedy: {c['remedy']}")
  for warning in verdict.get("warnings", []):
    lines.append(f"  [warn] {warning}")
  return "\n".join(lines)
