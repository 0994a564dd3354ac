"""Micro-batching: token sequences from many request threads, scored together by one worker thread.

A request hands its encoded rows to `submit` and waits on the returned future. The worker takes the
first waiting request, gathers whatever else arrives within `wait_s` (up to `max_rows` rows), and scores
them in one `score_ids` call, which sorts by length and pads to the scorer's fixed bucket shapes. So
concurrent requests share batches, only one thread ever calls the model (JAX and torch calls are not
interleaved), and a lone request waits at most `wait_s` for company.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

import numpy as np

_STOP = object()


class Closed(RuntimeError):
  """Submitted after close(): the server is shutting down."""


class Batcher:
  """score_ids(list of int32 arrays) -> float32 [N], run on one worker thread over gathered requests."""

  def __init__(self, score_ids, max_rows: int, wait_s: float):
    self._score_ids, self.max_rows, self.wait_s = score_ids, max_rows, wait_s
    self._queue = queue.Queue()
    self._closed = False
    self._lock = threading.Lock()  # Orders submit() against close(): nothing is queued behind the stop mark.
    self.batches = self.rows = self.requests = 0  # Written by the worker only.
    self._thread = threading.Thread(target=self._run, name="jaxreward-batcher", daemon=True)
    self._thread.start()

  def submit(self, ids: list[np.ndarray]) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    with self._lock:
      if self._closed:
        raise Closed("the server is shutting down")
      self._queue.put((ids, future))
    return future

  def close(self, timeout: float | None = None) -> None:
    """Scores everything already submitted, then stops the worker."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._queue.put(_STOP)
    self._thread.join(timeout)

  def _gather(self, first) -> tuple[list, bool]:
    batch, rows = [first], len(first[0])
    deadline = time.monotonic() + self.wait_s
    while rows < self.max_rows:
      left = deadline - time.monotonic()
      try:
        item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if item is _STOP:
        return batch, True
      batch.append(item)
      rows += len(item[0])
    return batch, False

  def _run(self) -> None:
    stop = False
    while not stop:
      item = self._queue.get()
      if item is _STOP:
        return
      batch, stop = self._gather(item)
      self._score(batch)

  def _score(self, batch: list) -> None:
    batch = [(ids, f) for ids, f in batch if f.set_running_or_notify_cancel()]
    if not batch:
      return
    all_ids = [x for ids, _ in batch for x in ids]
    try:
      r_N = self._score_ids(all_ids)
    except Exception as e:  # pylint: disable=broad-except  (handed to the requests; the worker lives on)
      for _, future in batch:
        future.set_exception(e)
      return
    self.batches += 1
    self.rows += len(all_ids)
    self.requests += len(batch)
    start = 0
    for ids, future in batch:
      future.set_result(r_N[start:start + len(ids)])
      start += len(ids)
