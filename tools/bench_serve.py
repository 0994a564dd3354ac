"""jaxreward's reward server vs the same exported model served the OpenRLHF way, on loopback, same run.

  python tools/convert_to_hf.py runs/small runs/small_hf
  python tools/bench_serve.py --model runs/small_hf [--clients 8] [--seconds 20] [--rows 8] [--json out.json]

Both servers speak OpenRLHF's protocol (POST /get_reward {"query": [...], "prompts": [...]} -> {"rewards"}):
  jaxreward: `python -m jaxreward.serve --model HF_DIR` (JAX model built from the folder, micro-batching worker,
             fixed bucket shapes compiled at startup);
  openrlhf:  `python tools/bench_serve.py --torch_server` below, as `openrlhf.cli.serve_rm` does it: plain
             transformers `AutoModelForSequenceClassification` in torch (fp32), the pad/EOS strip and EOS append,
             each request tokenized with padding to its longest query (truncation at max_length) and scored in
             the request's async handler (so requests are served one at a time).
Each side runs alone (its own subprocess, started, warmed with a few requests, then timed; the other side is
down), with --clients threads each sending requests of --rows queries (synthetic prompts + responses) back to
back for --seconds. Reported: requests/s, rewards/s, p50/p99 latency, recompiles during the timed window
(jaxreward's /health; torch compiles nothing), and jaxreward/openrlhf ratios. The two sides' rewards on the same
queries are compared first (they must agree: same weights). Check `uptime` first: on a loaded machine the
figures are noise; name the CPU (`lscpu`) with any figure. On a machine shared with other jobs torch's OpenMP
threads stall (measured at load ~13: 0.9 requests/s with the default threads, 16 with one); run with
`OMP_NUM_THREADS=1` there (the servers inherit it; XLA's CPU pool does not read it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import fastapi
import httpx
import numpy as np

from absl import app, flags

from jaxreward import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODEL = flags.DEFINE_string("model", None, "an exported HF folder (tools/convert_to_hf.py)", required=True)
_CLIENTS = flags.DEFINE_integer("clients", 8, "concurrent clients")
_SECONDS = flags.DEFINE_float("seconds", 20, "seconds of load per side")
_ROWS = flags.DEFINE_integer("rows", 8, "queries per request")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "default: the export's max_length")
_JSON = flags.DEFINE_string("json", None, "write the results here")
# The OpenRLHF-style side runs this file again as its server process.
_TORCH_SERVER = flags.DEFINE_bool("torch_server", False, "internal: serve the model with transformers")
_PORT = flags.DEFINE_integer("port", None, "internal: the torch server's port")


# --- The OpenRLHF-style server ----------------------------------------------------------------------------------


def torch_server(model_dir: str, host: str, port: int, max_length: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top

  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
  app = fastapi.FastAPI()

  def strip(text: str) -> str:
    while text.startswith(tok.pad_token):
      text = text[len(tok.pad_token):]
    while text.endswith(tok.pad_token) or text.endswith(tok.eos_token):
      text = text[:-len(tok.pad_token if text.endswith(tok.pad_token) else tok.eos_token)]
    return text + tok.eos_token

  @app.post("/get_reward")
  async def get_reward(request: fastapi.Request):
    queries = [strip(q) for q in (await request.json())["query"]]
    batch = tok(queries, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    with torch.no_grad():
      rewards = model(**batch).logits[:, 0]
    return {"rewards": rewards.tolist()}

  uvicorn.run(app, host=host, port=port, log_level="warning")


# --- Load generation ----------------------------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(cmd: list[str], url: str, probe: dict, timeout: float = 600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    try:
      r = httpx.post(url + "/get_reward", json=probe, timeout=60)
      if r.status_code == 200:
        return proc
      proc.kill()
      raise SystemExit(f"{' '.join(cmd)}: answered {r.status_code} {r.text[:200]}")
    except httpx.TransportError:
      time.sleep(0.5)
  proc.kill()
  raise SystemExit(f"{' '.join(cmd)}: not up in {timeout} s")


def stop(proc) -> None:
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(60)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def load(url: str, requests: list[dict], clients: int, seconds: float) -> dict:
  latencies, rewards, errors = [], [0], [0]
  lock = threading.Lock()
  stop_at = time.perf_counter() + seconds

  def client(k: int):
    with httpx.Client(base_url=url, timeout=120) as http:
      i = k
      while time.perf_counter() < stop_at:
        body = requests[i % len(requests)]
        t = time.perf_counter()
        r = http.post("/get_reward", json=body)
        dt = time.perf_counter() - t
        with lock:
          if r.status_code == 200 and len(r.json()["rewards"]) == len(body["query"]):
            latencies.append(dt)
            rewards[0] += len(body["query"])
          else:
            errors[0] += 1
        i += clients

  started = time.perf_counter()
  threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - started
  ms = np.asarray(latencies) * 1000
  return {"requests_per_s": len(latencies) / wall, "rewards_per_s": rewards[0] / wall, "requests": len(latencies),
          "errors": errors[0], "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "wall_s": wall}


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def flag_values():
  """The flag values as one mutable namespace (max_length is resolved from the model folder below)."""
  return types.SimpleNamespace(model=_MODEL.value, clients=_CLIENTS.value, seconds=_SECONDS.value, rows=_ROWS.value,
                               max_length=_MAX_LENGTH.value, json=_JSON.value, torch_server=_TORCH_SERVER.value,
                               port=_PORT.value)


def main(argv) -> int:
  del argv
  args = flag_values()
  if args.max_length is None:  # As load_scorer picks it for an HF folder.
    saved = {}
    for name in ("reward_normalization.json", "config.json"):
      if os.path.isfile(os.path.join(args.model, name)):
        with open(os.path.join(args.model, name)) as f:
          saved[name] = json.load(f)
    args.max_length = int(saved.get("reward_normalization.json", {}).get("max_length") or
                          saved.get("config.json", {}).get("max_position_embeddings") or 2048)
  if args.torch_server:
    torch_server(args.model, "127.0.0.1", args.port, args.max_length)
    return 0

  pairs = synthetic.generate(512, seed=1)
  requests = []
  for start_row in range(0, len(pairs) - args.rows + 1, args.rows):
    chunk = pairs[start_row:start_row + args.rows]
    requests.append({"query": [p.prompt + p.chosen for p in chunk], "prompts": [p.prompt for p in chunk]})
  probe = requests[0]
  sides = {
      "jaxreward": [sys.executable, "-m", "jaxreward.serve", "--model", args.model, "--max_length",
                    str(args.max_length)],
      "openrlhf": [sys.executable, os.path.abspath(__file__), "--torch_server", "--model", args.model,
                   "--max_length", str(args.max_length)],
  }
  results, first_rewards = {}, {}
  for name, cmd in sides.items():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = start(cmd + ["--port", str(port)], url, probe)
    startup = time.perf_counter() - started
    try:
      first_rewards[name] = httpx.post(url + "/get_reward", json=probe, timeout=60).json()["rewards"]
      load(url, requests, args.clients, min(3.0, args.seconds))  # Warm: allocator, thread pools, connections.
      before = httpx.get(url + "/health").json() if name == "jaxreward" else None
      results[name] = load(url, requests, args.clients, args.seconds)
      if before is not None:
        after = httpx.get(url + "/health").json()
        results[name].update(recompiles=after["recompiles"] - before["recompiles"], backend=after["model"],
                             rows_per_batch=after["rows_per_batch"])
      else:
        results[name].update(recompiles=0, backend="transformers (torch, eager)")
      results[name]["startup_s"] = startup
    finally:
      stop(proc)
    print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)

  diff = float(np.max(np.abs(np.subtract(first_rewards["jaxreward"], first_rewards["openrlhf"]))))
  j, t = results["jaxreward"], results["openrlhf"]
  lines = [f"CPU: {cpu_name()}; {args.clients} clients x {args.rows} queries/request, {args.seconds:g} s per side; "
           f"model {args.model}; max |reward difference| jaxreward vs openrlhf on one request: {diff:.2e}",
           "", "| | requests/s | rewards/s | p50 ms | p99 ms | recompiles | errors |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['requests_per_s']:.1f} | {r['rewards_per_s']:.1f} | {r['p50_ms']:.1f} | "
                 f"{r['p99_ms']:.1f} | {r['recompiles']} | {r['errors']} |")
  lines.append(f"| jaxreward / openrlhf | {j['requests_per_s'] / t['requests_per_s']:.2f}x | "
               f"{j['rewards_per_s'] / t['rewards_per_s']:.2f}x | {j['p50_ms'] / t['p50_ms']:.2f}x | "
               f"{j['p99_ms'] / t['p99_ms']:.2f}x | | |")
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cpu": cpu_name(), "args": dict(vars(args)), "max_reward_diff": diff, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(main)
