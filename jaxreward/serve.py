"""A reward server: a jaxreward model behind HTTP, for RL jobs (OpenRLHF's protocol and a native one).

  python -m jaxreward.serve (or jaxreward-serve) --model RUN_OR_HF_DIR [--port 5000] [--host 127.0.0.1] [--normalize_reward]

  POST /get_reward  OpenRLHF's remote reward-model protocol, unchanged (`--remote_rm_url http://HOST:PORT/get_reward`):
                    {"query": [text, ...], "prompts": [text, ...] (optional), ...} -> {"rewards": [float, ...]}
  POST /score       {"rows": [{"prompt": P, "response": R}, ...]}, P and R text or lists of {role, content}
                    messages -> {"rewards": [...], "rewards_normalized": [...] or null}
  GET  /health      model, counts (requests, rows, batches, errors), compiled shapes and recompiles since startup

/get_reward scores each query as prompt + response split at `prompts[i]` (protocol.py says exactly how);
its rewards are raw, or normalised with the validation mean/std saved at training under --normalize_reward
(OpenRLHF's flag of the same name). /score always returns both.

Requests are encoded on request threads and scored by one worker thread that gathers concurrent requests
for up to --batch_wait_ms into batches of the scorer's fixed (rows, length) shapes; every shape is compiled
before the server listens, so a recompile while serving is a bug, and /health counts them. A malformed
request gets a 4xx JSON `{"error": "..."}`; bodies, rows per request and characters per row are bounded.
SIGTERM stops accepting connections, finishes the requests in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time

import fastapi
from fastapi.responses import JSONResponse
import jax
import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
import uvicorn

from jaxreward import batcher as batcher_lib
from jaxreward.configuration import ConfigError
from jaxreward.protocol import BadRequest, Limits, QuerySplitter, parse_get_reward, parse_json, parse_score


class CompileCounter:
  """XLA compilations in this process, from jax.monitoring's backend-compile event."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == self.EVENT:
      self.count += 1

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)


# ---------------------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------------------


class Service:
  """The scorer, its batching worker and the counters /health reports."""

  def __init__(self, scorer, limits: Limits, normalize_reward: bool, batch_rows: int, batch_wait_s: float,
               compiles: CompileCounter | None = None):
    self.scorer, self.limits, self.normalize_reward = scorer, limits, normalize_reward
    self.split = QuerySplitter(scorer.tokenizer)
    self.batcher = batcher_lib.Batcher(scorer.score_ids, batch_rows, batch_wait_s)
    self.compiles = compiles
    self.compiles_at_start = compiles.count if compiles else 0
    self.counts = collections.Counter()  # Touched on the event loop's thread only.
    self.started = time.time()
    # Fast tokenizers are Rust objects that raise "Already borrowed" when two threads reconfigure one at once.
    self._encode_lock = threading.Lock()

  def _encode(self, prompts, responses):
    with self._encode_lock:
      try:
        return self.scorer.encode(prompts, responses)
      except ConfigError as e:  # A chat template that rejects the request's roles.
        raise BadRequest(422, str(e)) from None

  async def rewards(self, prompts, responses) -> np.ndarray:
    ids = await run_in_threadpool(self._encode, prompts, responses)
    try:
      future = self.batcher.submit(ids)
    except batcher_lib.Closed as e:
      raise HTTPException(503, str(e)) from None
    r_N = await asyncio.wrap_future(future)
    self.counts["rows"] += len(r_N)
    return r_N

  def health(self) -> dict:
    s = self.scorer
    recompiles = (self.compiles.count - self.compiles_at_start) if self.compiles else None
    return {"status": "ok", "model": s.description, "uptime_s": round(time.time() - self.started, 3),
            "requests": {k: v for k, v in self.counts.items() if k.startswith("/")},
            "rows": self.counts["rows"], "errors_4xx": self.counts["4xx"], "errors_5xx": self.counts["5xx"],
            "batches": self.batcher.batches,
            "rows_per_batch": round(self.batcher.rows / max(self.batcher.batches, 1), 2),
            "compiled_shapes": len(s.shapes()), "compiles_before_serving": self.compiles_at_start,
            "recompiles": recompiles,
            "buckets": {"rows": sorted({r for r, _ in s.shapes()}), "lengths": list(s.buckets)},
            "max_length": s.max_length, "normalize_reward": self.normalize_reward,
            "normalization": {"mean": s.mean, "std": s.std}, "limits": dataclasses.asdict(self.limits)}


async def _read_json(request: fastapi.Request, limits: Limits):
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limits.max_body_bytes:
    raise BadRequest(413, f"body of {declared} bytes; at most {limits.max_body_bytes} (--max_body_bytes)")
  chunks, size = [], 0
  async for chunk in request.stream():  # A chunked body has no length to check up front.
    size += len(chunk)
    if size > limits.max_body_bytes:
      raise BadRequest(413, f"body over {limits.max_body_bytes} bytes (--max_body_bytes)")
    chunks.append(chunk)
  return parse_json(b"".join(chunks))


def build_app(service: Service) -> fastapi.FastAPI:
  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    # uvicorn has drained the requests in flight; the worker finishes anything still queued.
    service.batcher.close()

  app = fastapi.FastAPI(title="jaxreward reward server", lifespan=lifespan)
  limits = service.limits

  def error(status: int, message: str) -> JSONResponse:
    service.counts["4xx" if status < 500 else "5xx"] += 1
    return JSONResponse({"error": message}, status_code=status)

  @app.exception_handler(BadRequest)
  async def bad_request(request, e: BadRequest):
    return error(e.status, str(e))

  @app.exception_handler(HTTPException)  # Starlette's own: unknown path 404, wrong method 405.
  async def http_error(request, e: HTTPException):
    return error(e.status_code, str(e.detail))

  @app.exception_handler(Exception)
  async def crash(request, e: Exception):
    return error(500, f"internal error: {type(e).__name__}: {e}")

  @app.post("/get_reward")
  async def get_reward(request: fastapi.Request):
    queries, prompts = parse_get_reward(await _read_json(request, limits), limits)
    sides = [service.split(q, None if prompts is None else prompts[i]) for i, q in enumerate(queries)]
    r_N = await service.rewards([p for p, _ in sides], [r for _, r in sides])
    service.counts["/get_reward"] += 1
    return {"rewards": (service.scorer.normalize(r_N) if service.normalize_reward else r_N).tolist()}

  @app.post("/score")
  async def score(request: fastapi.Request):
    prompts, responses = parse_score(await _read_json(request, limits), limits)
    r_N = await service.rewards(prompts, responses)
    service.counts["/score"] += 1
    z_N = service.scorer.normalize(r_N).tolist() if service.scorer.mean is not None else None
    return {"rewards": r_N.tolist(), "rewards_normalized": z_N}

  @app.get("/health")
  async def health():
    return service.health()

  return app


# ---------------------------------------------------------------------------------------------------------------
# The HTTP server (the command line is jaxreward/commands/serve.py)
# ---------------------------------------------------------------------------------------------------------------


def make_server(service: Service, host: str, port: int, drain_timeout: float | None = None,
                log_level: str = "warning") -> uvicorn.Server:
  """`.run()` serves until SIGTERM/SIGINT (or `.should_exit = True` from another thread), then drains."""
  return uvicorn.Server(uvicorn.Config(build_app(service), host=host, port=port, log_level=log_level,
                                       timeout_graceful_shutdown=drain_timeout))


if __name__ == "__main__":
  # `python -m jaxreward.serve` predates jaxreward.commands; runpy keeps it working without an import cycle.
  import runpy  # pylint: disable=g-import-not-at-top
  runpy.run_module("jaxreward.commands.serve", run_name="__main__", alter_sys=True)
