"""Orbax checkpoints that keep the best step by validation accuracy *and* the latest step.

Plain `best_fn` + `max_to_keep` would delete the latest checkpoint whenever it is not among the best,
and resuming would then go back in time; a preservation policy keeps both. Each step stores three items:
`params`, `optimizer` (the step counter and Adam state) and `data` (the data iterator's state), so a resumed
run continues on exactly the next batch, while scoring and export restore `params` alone (a third of the
memory of the whole state). Work dirs written before the split hold one `state` item; they still restore
(params-only loading then reads the whole state and keeps its parameters). A checkpoint whose blocks are laid out
otherwise than the model's (one per layer vs stacked, model.scan_layers) is refused with the setting that reads it.
"""

from __future__ import annotations

import logging
import re
import sys

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from jaxreward import hosts, optimizer, storage
from jaxreward.configuration import ConfigError

BEST_METRIC = "val_accuracy"
DAMAGED = "checkpoints.damaged"  # Beside checkpoints/: damaged steps set aside by a fallback (orbax never lists it).


class CheckpointError(ConfigError):
  """A checkpoint that cannot be written or read, as one line naming its folder."""


_OS_REASONS = re.compile(r"No space left on device|File too large|Disk quota exceeded|Read-only file system|"
                         r"Permission denied|Input/output error")


def _one_line(error: BaseException) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  reason = _OS_REASONS.search(text)
  if reason:
    return reason.group(0)
  text = text.split(" See full TensorStore details")[0]  # The rest is the store's whole spec.
  return text if len(text) <= 300 else text[:300] + "..."


class _QuietOrbax(logging.Filter):
  """Drops orbax's own error logs (whole tracebacks from its writer threads): the failure reaches the user
  once, as the CheckpointError raised from save, wait or restore. Also drops its warning that an item has no
  _CHECKPOINT_METADATA of its own, which every restore of the params item alone prints (the step has one)."""

  def filter(self, record):
    if record.levelno == logging.WARNING and record.getMessage().startswith("Metadata file does not exist"):
      return not _from_orbax(record)
    return not (record.levelno >= logging.ERROR and _from_orbax(record))


def _from_orbax(record) -> bool:
  # With params and optimizer as separate items, a damaged item's failed read leaves the other item's task
  # unretrieved: asyncio logs it with the traceback in exc_info, not in the message.
  if "orbax" in record.pathname or "orbax" in record.getMessage():
    return True
  return _through_orbax(record.exc_info[2] if record.exc_info else None)


def _through_orbax(tb) -> bool:
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


for _name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" for orbax's write tasks.
  logging.getLogger(_name).addFilter(_QuietOrbax())
_unraisable = sys.unraisablehook


def _quiet_closed_loop(unraisable):
  """After a failed save, tensorstore's callbacks find orbax's event loop closed, once per pending write; after
  a failed read (reported once, as a CheckpointError), a sibling read coroutine of orbax's is collected with its
  own error still attached. Neither is news to the user."""
  closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
  if not (closed_loop or _through_orbax(unraisable.exc_traceback)):
    _unraisable(unraisable)


sys.unraisablehook = _quiet_closed_loop


class Checkpointer:
  def __init__(self, workdir: str, keep_best: int):
    self.directory = storage.join(workdir, "checkpoints")  # A URL goes to orbax as it is.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=managers.AnyPreservationPolicy([
            managers.LatestN(1),
            managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best),
        ]),
        best_fn=lambda m: m[BEST_METRIC], best_mode="max", enable_async_checkpointing=True)
    self._saving = None  # The step of a save that may still be in flight.
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for a folder it cannot use)
      raise CheckpointError(f"{self.directory}: cannot open the checkpoints ({_one_line(e)})") from None

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
    optimizer = {k: v for k, v in state.items() if k != "params"}  # The step counter and Adam state.
    try:
      self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                                      optimizer=ocp.args.StandardSave(optimizer),
                                                      data=ocp.args.JsonSave(data_state)),
                        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()}, force=True)
    except Exception as e:  # pylint: disable=broad-except  (also an earlier background save's failure)
      self._failed(f"saving step {step}" if self._saving is None else f"saving step {self._saving} or {step}", e)
    self._saving = step

  def restore(self, step: int, target_state):
    """(state, data state) onto `target_state`'s shapes, dtypes and shardings (any mesh, any device count)."""
    self._check_layout(step, target_state["params"])
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      if self._single_item(step):
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      data=ocp.args.JsonRestore()))
        state = restored["state"]
      else:
        optimizer = {k: v for k, v in abstract.items() if k != "params"}
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              params=ocp.args.StandardRestore(abstract["params"]), optimizer=ocp.args.StandardRestore(optimizer),
              data=ocp.args.JsonRestore()))
        except Exception as first:  # pylint: disable=broad-except  (re-raised unless it is the one known difference)
          try:
            restored = self._restore_with_frozen_moments(step, abstract["params"], optimizer)
          except Exception:  # pylint: disable=broad-except  (a damaged step: the first error says what)
            restored = None
          if restored is None:
            raise first
        state = dict(restored["optimizer"], params=restored["params"])
    except Exception as e:  # pylint: disable=broad-except  (a damaged step fails in many ways)
      raise CheckpointError(f"{self.directory}/{step}: unreadable ({_one_line(e)})") from None
    if not isinstance(restored["data"], dict) or not restored["data"]:
      raise CheckpointError(f"{self.directory}/{step}: unreadable (empty data iterator state)")
    return state, restored["data"]

  def restore_params(self, step: int, target_params, make_target_state=None):
    """The parameters alone onto `target_params` (arrays or ShapeDtypeStructs with shardings). A work dir from
    before the split needs `make_target_state()`, a whole train state to restore onto."""
    self._check_layout(step, target_params)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
    if self._single_item(step):
      if make_target_state is None:
        raise ConfigError(f"{self.directory}/{step}: an old single-item checkpoint; load it with "
                          "artifacts.load, which rebuilds the optimizer state it was saved with")
      return self.restore(step, make_target_state())[0]["params"]
    try:
      return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as e:  # pylint: disable=broad-except  (a damaged step fails in many ways)
      raise CheckpointError(f"{self.directory}/{step}: unreadable ({_one_line(e)})") from None

  def _restore_with_frozen_moments(self, step: int, abstract_params, abstract_optimizer) -> dict | None:
    """A step saved before the untied LM head was frozen holds Adam moments for it (optimizer.FROZEN) that the
    target no longer has: the items restored without them, or None if the saved optimizer differs otherwise.
    Read by a handler of its own (a partial restore), so the manager keeps saving as it did."""
    path = storage.path(self.directory) / str(step) / "optimizer"
    handler = ocp.PyTreeCheckpointHandler()
    try:
      saved = jax.tree_util.tree_flatten_with_path(handler.metadata(path).tree)[0]
      frozen = [p for p, _ in saved if any(name in jax.tree_util.keystr(p) for name in optimizer.FROZEN)]
      if not frozen or len(saved) != len(jax.tree.leaves(abstract_optimizer)) + len(frozen):
        return None
      restored = handler.restore(path, args=ocp.args.PyTreeRestore(
          item=abstract_optimizer, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_optimizer),
          partial_restore=True))
    finally:
      handler.close()
    rest = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                              data=ocp.args.JsonRestore()))
    return {"params": rest["params"], "optimizer": restored, "data": rest["data"]}

  def _check_layout(self, step: int, target_params) -> None:
    """A ConfigError (the step is sound, the setting is not: no fallback to older steps) when the step's blocks are
    stacked and the model's are not, or the other way round."""
    item = "state" if self._single_item(step) else "params"
    try:
      stored = ocp.StandardCheckpointer().metadata(storage.path(self.directory) / str(step) / item).item_metadata.tree
    except Exception:  # pylint: disable=broad-except  (a damaged step: the restore itself reports it)
      return
    stored_stacked = _blocks_stacked(stored.get("params", {}) if item == "state" else stored)
    wanted_stacked = _blocks_stacked(target_params)
    if None not in (stored_stacked, wanted_stacked) and stored_stacked != wanted_stacked:
      layout = lambda stacked: "stacked on a layers axis" if stacked else "one per layer"
      raise ConfigError(f"{self.directory}/{step}: the checkpoint holds the blocks {layout(stored_stacked)}, the "
                        f"model {layout(wanted_stacked)}; set --config.model.scan_layers={stored_stacked} to read it")

  def _single_item(self, step: int) -> bool:
    return storage.isdir(storage.join(self.directory, str(step), "state"))

  def restore_latest(self, target_state, accept, log):
    """(step, state, data state) of the newest step that reads back and that `accept(data state)` takes.

    Damaged newer steps are named in a warning and moved to `<workdir>/checkpoints.damaged/` (process 0), so
    the resumed run can save those steps again. (None, target_state, None) when there is no step at all;
    CheckpointError when none is usable.
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, target_state)
        try:
          accept(data)
        except Exception as e:  # pylint: disable=broad-except  (grain raises many types for a bad state)
          raise CheckpointError(f"{self.directory}/{step}: unreadable data iterator state ({_one_line(e)})") from None
      except CheckpointError as e:
        problems.append(str(e))
        log(f"warning: {e}; falling back to the previous step")
        continue
      if problems:
        self._set_aside([s for s in self.all_steps() if s > step])
      return step, state, data
    if problems:
      raise CheckpointError(f"no usable checkpoint: {'; '.join(problems)}; move {self.directory} away to start over")
    return None, target_state, None

  def _set_aside(self, steps) -> None:
    if hosts.is_main():
      damaged = storage.path(self.directory).parent / DAMAGED
      for step in steps:
        target, n = damaged / str(step), 1
        while target.exists():  # The same step may be damaged again in a later attempt.
          target, n = damaged / f"{step}.{n}", n + 1
        storage.move_folder(storage.join(self.directory, str(step)), target)
    if hosts.several():
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoint fallback")
    self.manager.reload()

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (a background save's failure surfaces here)
      self._failed(f"saving step {self._saving}", e)
    self._saving = None

  def _failed(self, what: str, error: BaseException):
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except  (the first failure is the one to report)
      pass
    raise CheckpointError(f"{self.directory}: {what} failed ({_one_line(error)}); free space or fix the folder, "
                          "then re-run the same command: it resumes from the last complete checkpoint") from None

  def close(self) -> None:
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{self.directory}: finishing the last save failed ({_one_line(e)}); free space or "
                            "fix the folder, then re-run the same command") from None


def _blocks_stacked(params) -> bool | None:
  """Whether a parameter tree's blocks are one stacked module (model.scan_layers) rather than one per layer (keys
  0, 1, ...); None when it has no blocks."""
  blocks = params.get("backbone", {}).get("blocks") if hasattr(params, "get") else None
  if not blocks:
    return None
  return not all(str(key).isdigit() for key in blocks.keys())


def parse_which(text: str) -> str | int:
  """A --checkpoint value: best, latest or a step number."""
  if text in ("best", "latest"):
    return text
  if str(text).isdigit():
    return int(text)
  raise ConfigError(f"--checkpoint must be best, latest or a step number, got {text!r}")
