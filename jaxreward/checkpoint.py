"""Orbax checkpoints that keep the best step by validation accuracy *and* the latest step.

Plain `best_fn` + `max_to_keep` would delete the latest checkpoint whenever it is not among the best,
and resuming would then go back in time; a preservation policy keeps both. Each step stores three items:
`params`, `optimizer` (the step counter and Adam state) and `data` (the data iterator's state), so a resumed
run continues on exactly the next batch, while scoring and export restore `params` alone (a third of the
memory of the whole state). Work dirs written before the split hold one `state` item; they still restore
(params-only loading then reads the whole state and keeps its parameters).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from jaxreward.configuration import ConfigError

BEST_METRIC = "val_accuracy"


class Checkpointer:
  def __init__(self, workdir: str, keep_best: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=managers.AnyPreservationPolicy([
            managers.LatestN(1),
            managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best),
        ]),
        best_fn=lambda m: m[BEST_METRIC], best_mode="max", enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def resolve(self, which: str | int) -> int:
    """The step that 'best', 'latest' or a step number names, or a one-line ConfigError."""
    steps = self.all_steps()
    if not steps:
      raise ConfigError(f"{self.directory}: no checkpoint saved yet")
    if which == "best":
      return self.best_step()
    if which == "latest":
      return self.latest_step()
    if int(which) not in steps:
      raise ConfigError(f"{self.directory}: no checkpoint at step {which}; have {sorted(steps)}")
    return int(which)

  def save(self, step: int, state, data_state: dict, metrics: dict | None) -> None:
    """Starts an asynchronous save; the train state's buffers may be donated right after.

    `metrics=None` marks a resume-only checkpoint (preemption): it is kept while it is the latest but never
    ranked as best.
    """
    optimizer = {"step": state["step"], "opt_state": state["opt_state"]}
    self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                                    optimizer=ocp.args.StandardSave(optimizer),
                                                    data=ocp.args.JsonSave(data_state)),
                      metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()}, force=True)

  def restore(self, step: int, target_state):
    """(state, data state) onto `target_state`'s shapes, dtypes and shardings (any mesh, any device count)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    if self._single_item(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    data=ocp.args.JsonRestore()))
      return restored["state"], restored["data"]
    optimizer = {"step": abstract["step"], "opt_state": abstract["opt_state"]}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract["params"]), optimizer=ocp.args.StandardRestore(optimizer),
        data=ocp.args.JsonRestore()))
    return dict(restored["optimizer"], params=restored["params"]), restored["data"]

  def restore_params(self, step: int, target_params, make_target_state=None):
    """The parameters alone onto `target_params` (arrays or ShapeDtypeStructs with shardings). A work dir from
    before the split needs `make_target_state()`, a whole train state to restore onto."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
    if self._single_item(step):
      if make_target_state is None:
        raise ConfigError(f"{self.directory}/{step}: an old single-item checkpoint; load it with "
                          "artifacts.load, which rebuilds the optimizer state it was saved with")
      return self.restore(step, make_target_state())[0]["params"]
    return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]

  def _single_item(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), "state"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def parse_which(text: str) -> str | int:
  """A --checkpoint value: best, latest or a step number."""
  if text in ("best", "latest"):
    return text
  if str(text).isdigit():
    return int(text)
  raise ConfigError(f"--checkpoint must be best, latest or a step number, got {text!r}")
