"""SIGTERM/SIGHUP/SIGINT handling: finish the current step, checkpoint, and exit with a distinct code.

Preemptible TPU VMs and most schedulers send SIGTERM before killing a job, and a dropped ssh session sends
SIGHUP; losing the work since the last evaluation to either is avoidable. The handler only sets a flag that the
training loop checks between steps, so a step is never interrupted halfway and the checkpoint is consistent.

In a multi-host job joined by `jax.distributed`, SIGTERM is left to JAX's preemption service: a notice on any
host starts a protocol that picks one step every host reaches, and `multihost_utils.reached_preemption_sync_point`
turns true there on all of them at once, with no collective of ours. SIGINT and SIGHUP, which that service does
not watch, are agreed on by an all-gather at log cadence.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


def preemption_service_active() -> bool:
  """True when JAX's coordination service runs with its preemption sync manager (it owns SIGTERM then)."""
  return jax.process_count() > 1 and jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class StopSignal:
  def __init__(self, signals=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    self._sync_point = preemption_service_active()
    if self._sync_point:  # A Python handler would hide SIGTERM from the preemption notifier.
      signals = tuple(s for s in signals if s != signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C means "now".
    self._event.set()

  def requested(self, step: int, gather: bool = True) -> bool:
    """True once a stop was asked for on any process; all processes get the same answer at the same step.

    Every process must call this at every step with the same `gather`: the preemption sync point counts steps,
    and `gather` (an all-gather across hosts, so not every step) must be a collective all take part in.
    """
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    if self._sync_point and multihost_utils.reached_preemption_sync_point(step):
      return True
    return gather and bool(multihost_utils.process_allgather(local).any())

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
