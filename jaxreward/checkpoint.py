"""Orbax checkpoints that keep the best step by validation accuracy *and* the latest step.

Plain `best_fn` + `max_to_keep` would delete the latest checkpoint whenever it is not among the best,
and resuming would then go back in time; a preservation policy keeps both. Each step stores the train
state and the data iterator's state, so a resumed run continues on exactly the next batch.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

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

  def save(self, step: int, state, data_state: dict, metrics: dict | None) -> None:
    """Starts an asynchronous save; the train state's buffers may be donated right after.

    `metrics=None` marks a resume-only checkpoint (preemption): it is kept while it is the latest but never
    ranked as best.
    """
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)),
                      metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()}, force=True)

  def restore(self, step: int, target_state):
    """Restores onto `target_state`'s shapes, dtypes and shardings (any mesh, any device count)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
