"""SIGTERM/SIGINT handling: finish the current step, checkpoint, and exit with a distinct code.

Preemptible TPU VMs and most schedulers send SIGTERM before killing a job; losing the work since the
last evaluation to it is avoidable. The handler only sets a flag that the training loop checks between
steps, so a step is never interrupted halfway and the checkpoint is always consistent.
"""

from __future__ import annotations

import signal
import threading

import jax


class StopSignal:
  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C means "now".
    self._event.set()

  def requested(self) -> bool:
    """True once a signal arrived on any process; every process must agree before stopping together."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.process_allgather(local).any())

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
