"""serve (the reward server, run as its real CLI on a loopback port) and reward_function (TRL's reward_funcs)."""

import concurrent.futures
import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, xla_flags

from jaxreward import corpus, protocol, serve
from jaxreward.commands import serve as serve_command

START_TIMEOUT_S = 300  # Loading and compiling every shape; slow when other jobs share the 2 cores.


@pytest.fixture(scope="module")
def run(tiny_run):
  """The session's tiny model, its validation pairs, and a reference scorer."""
  import jaxreward  # pylint: disable=g-import-not-at-top
  config, workdir = tiny_run["config"], tiny_run["workdir"]
  pairs = corpus.prepare(config, lambda _: None).validation.pairs
  return {"workdir": workdir, "pairs": pairs, "scorer": jaxreward.load_scorer(workdir)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(workdir, *flags):
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags())  # One device, as users run it.
  env["PYTHONPATH"] = str(ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "jaxreward.serve", "--model", workdir, "--port", str(port), *flags],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + START_TIMEOUT_S
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()}")
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        return proc, url
    except httpx.TransportError:
      time.sleep(0.5)
  proc.kill()
  raise AssertionError(f"server not up in {START_TIMEOUT_S} s")


def stop(proc):
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def server(run):
  """The app on uvicorn in a thread of this process, over the reference scorer (the CLI: the SIGTERM test)."""
  scorer = run["scorer"]
  compiles = serve.CompileCounter()
  scorer.warmup()
  limits = protocol.Limits(max_body_bytes=65536, max_rows=32, max_chars=2000)
  service = serve.Service(scorer, limits, normalize_reward=True, batch_rows=64, batch_wait_s=0.005,
                          compiles=compiles)
  port = free_port()
  uv = serve.make_server(service, "127.0.0.1", port)
  thread = threading.Thread(target=uv.run)
  thread.start()
  deadline = time.time() + 60
  while not uv.started and thread.is_alive() and time.time() < deadline:
    time.sleep(0.05)
  assert uv.started, "server did not start"
  with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
    yield client
  uv.should_exit = True
  thread.join(60)
  compiles.close()
  assert not thread.is_alive()


def rows_of(pairs):
  return [p.prompt for p in pairs], [p.chosen for p in pairs]


def chat_rows(pairs):
  prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p.prompt}] for p in pairs]
  return prompts, [[{"role": "assistant", "content": p.chosen}] for p in pairs]


def post_score(client, prompts, responses):
  r = client.post("/score", json={"rows": [{"prompt": p, "response": x} for p, x in zip(prompts, responses)]})
  assert r.status_code == 200, r.text
  return r.json()


# --- Rewards equal load_scorer's --------------------------------------------------------------------------------


def test_score_endpoint_equals_load_scorer(run, server):
  scorer = run["scorer"]
  for prompts, responses in (rows_of(run["pairs"][:20]), chat_rows(run["pairs"][20:27])):
    out = post_score(server, prompts, responses)
    want = scorer(prompts, responses)
    np.testing.assert_allclose(out["rewards"], want, atol=1e-5)
    np.testing.assert_allclose(out["rewards_normalized"], scorer.normalize(want), atol=1e-5)


def test_get_reward_is_openrlhf_protocol(run, server):
  scorer, tok = run["scorer"], run["scorer"].tokenizer
  prompts, responses = rows_of(run["pairs"][:9])
  # OpenRLHF decodes whole sequences: left padding, the policy's EOS, trailing padding.
  queries = [tok.pad_token * (i % 3) + p + r + tok.eos_token + tok.pad_token * (i % 2)
             for i, (p, r) in enumerate(zip(prompts, responses))]
  out = server.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": [""] * 9})
  assert out.status_code == 200 and list(out.json()) == ["rewards"], out.text
  # --normalize_reward: normalised, and split at the prompt exactly as training encodes a text pair.
  np.testing.assert_allclose(out.json()["rewards"], scorer(prompts, responses, normalized=True), atol=1e-5)
  # Without prompts (OpenRLHF's older clients): the whole text is the response.
  out = server.post("/get_reward", json={"query": queries})
  np.testing.assert_allclose(out.json()["rewards"], scorer([""] * 9, [p + r for p, r in zip(prompts, responses)],
                                                           normalized=True), atol=1e-5)


def test_query_splitter(run):
  tok = run["scorer"].tokenizer
  split = protocol.QuerySplitter(tok)
  pad, eos = tok.pad_token, tok.eos_token
  assert split(pad * 2 + "Q: 1?" + " A" + eos + pad * 3, "Q: 1?") == ("Q: 1?", " A")
  assert split("Q: 1? A" + eos + eos, "Q: 2?") == ("", "Q: 1? A")  # Not its prompt: the whole text.
  assert split("Q: 1? A", None) == ("", "Q: 1? A")
  assert split(eos, "") == ("", "")


# --- Concurrency and recompiles ---------------------------------------------------------------------------------


def test_concurrent_requests_from_threads(run, server):
  scorer, pairs = run["scorer"], run["pairs"]
  before = server.get("/health").json()
  rng = np.random.default_rng(0)
  jobs = []
  for _ in range(32):
    idx = rng.choice(len(pairs), size=int(rng.integers(1, 13)), replace=False)
    jobs.append((rng.random() < 0.5, [pairs[i] for i in idx]))

  def call(job):
    chat, chosen = job
    prompts, responses = chat_rows(chosen) if chat else rows_of(chosen)
    with httpx.Client(base_url=str(server.base_url), timeout=120) as client:
      return post_score(client, prompts, responses)["rewards"], scorer(prompts, responses)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for got, want in pool.map(call, jobs):
      np.testing.assert_allclose(got, want, atol=1e-5)
  after = server.get("/health").json()
  assert after["requests"]["/score"] - before["requests"].get("/score", 0) == 32
  assert after["rows"] - before["rows"] == sum(len(chosen) for _, chosen in jobs)
  # Every batch was one of the shapes compiled at startup.
  assert after["recompiles"] == 0 and after["compiled_shapes"] == 6


# --- Malformed requests -----------------------------------------------------------------------------------------

GOOD = {"rows": [{"prompt": "Which is larger, 3 or 9?\nAnswer:", "response": " 9"}]}
MALFORMED = {
    "bad_json": ("/score", b'{"rows": [', 400, "not valid JSON"),
    "not_utf8": ("/score", b'{"rows": "\xff"}', 400, "UTF-8"),
    "not_object": ("/score", [1, 2], 422, "expected a JSON object"),
    "missing_rows": ("/score", {"row": []}, 422, "missing key 'rows'"),
    "rows_not_list": ("/score", {"rows": "a"}, 422, "expected an array, got string"),
    "empty_rows": ("/score", {"rows": []}, 422, "empty array"),
    "row_not_object": ("/score", {"rows": ["a"]}, 422, "rows[0]"),
    "no_response": ("/score", {"rows": [{"prompt": "a"}]}, 422, "\"response\""),
    "prompt_number": ("/score", {"rows": [{"prompt": 3, "response": "a"}]}, 422, "rows[0].prompt"),
    "empty_messages": ("/score", {"rows": [{"prompt": "a", "response": []}]}, 422, "empty array"),
    "message_no_content": ("/score", {"rows": [{"prompt": [{"role": "user"}], "response": "a"}]}, 422,
                           "rows[0].prompt[0]"),
    "content_number": ("/score", {"rows": [{"prompt": "a", "response": [{"role": "assistant", "content": 1}]}]},
                       422, "rows[0].response[0].content"),
    "surrogate": ("/score", b'{"rows": [{"prompt": "a", "response": "\\ud800"}]}', 422, "surrogate"),
    "no_query": ("/get_reward", {"prompts": ["a"]}, 422, "missing key 'query'"),
    "query_null": ("/get_reward", {"query": None}, 422, "got null"),
    "empty_query": ("/get_reward", {"query": []}, 422, "empty array"),
    "query_number": ("/get_reward", {"query": ["a", 2]}, 422, "query[1]"),
    "prompts_mismatch": ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 422, "1 prompts for 2 queries"),
    "too_many_rows": ("/get_reward", {"query": ["a"] * 33}, 413, "at most 32"),
    "row_too_long": ("/score", {"rows": [{"prompt": "a" * 1500, "response": "b" * 600}]}, 413, "2100 characters"),
    "body_too_large": ("/get_reward", {"query": ["a" * 1000] * 70}, 413, "at most 65536"),
    "chunked_too_large": ("/get_reward", iter([b'{"query": ["' + b"a" * 40000, b"a" * 40000 + b'"]}']), 413,
                          "over 65536"),
    "wrong_method": ("/score", None, 405, "Method Not Allowed"),
    "unknown_path": ("/reward", {"query": ["a"]}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_4xx_and_server_lives_on(run, server, case):
  path, body, status, message = MALFORMED[case]
  if body is None:
    r = server.get(path)
  elif not isinstance(body, (dict, list)):  # Raw bytes, or an iterator: sent chunked, with no length.
    r = server.post(path, content=body, headers={"content-type": "application/json"})
  else:
    r = server.post(path, json=body)
  assert r.status_code == status, r.text
  assert message in r.json()["error"], r.json()
  good = server.post("/score", json=GOOD)
  assert good.status_code == 200
  want = run["scorer"]([GOOD["rows"][0]["prompt"]], [GOOD["rows"][0]["response"]])
  np.testing.assert_allclose(good.json()["rewards"], want, atol=1e-5)


def test_health_counts_errors(server):
  health = server.get("/health").json()
  assert health["status"] == "ok" and health["normalize_reward"] is True
  assert health["errors_5xx"] == 0 and health["recompiles"] == 0
  assert health["limits"] == {"max_body_bytes": 65536, "max_rows": 32, "max_chars": 2000}
  errors = health["errors_4xx"]
  assert server.post("/score", content=b"[").status_code == 400
  assert server.get("/health").json()["errors_4xx"] == errors + 1


# --- SIGTERM ----------------------------------------------------------------------------------------------------


def test_sigterm_drains_a_request_in_flight_and_exits_0(run):
  proc, url = start_server(run["workdir"], "--log_level", "info")
  try:
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(GOOD).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
      # Headers and half the body: the request is in flight when SIGTERM arrives.
      conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
      time.sleep(1.0)
      proc.send_signal(signal.SIGTERM)
      time.sleep(1.0)
      assert proc.poll() is None, "exited with a request in flight"
      with pytest.raises(httpx.TransportError):  # No new connections while draining.
        httpx.get(url + "/health", timeout=5)
      conn.sendall(body[10:])
      response = b""
      while chunk := conn.recv(65536):  # A draining server closes the connection after its response.
        response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response
    got = json.loads(response.split(b"\r\n\r\n", 1)[1])["rewards"]
    np.testing.assert_allclose(got, run["scorer"]([GOOD["rows"][0]["prompt"]], [GOOD["rows"][0]["response"]]),
                               atol=1e-5)
    assert proc.wait(60) == 0
    assert "Finished server process" in proc.stdout.read()
  finally:
    stop(proc)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
  for argv, expect in ((["--model", str(tmp_path / "missing")], "no such file or directory"),
                       (["--model", str(tmp_path)], "neither a jaxreward"),
                       (["--model", str(tmp_path), "--max_rows", "0"], "--max_rows must be >= 1")):
    assert serve_command.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expect in err, err


# --- TRL reward function ----------------------------------------------------------------------------------------


def test_reward_fn_text_and_conversational(run):
  import jaxreward  # pylint: disable=g-import-not-at-top
  scorer = run["scorer"]
  fn = jaxreward.reward_fn(run["workdir"], normalized=True)
  assert fn.__name__ == "jaxreward_run"
  prompts, completions = rows_of(run["pairs"][:6])
  # TRL passes completion ids, the trainer state and every dataset column as keyword arguments.
  got = fn(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * 6, trainer_state=None,
           category=["x"] * 6)
  assert isinstance(got, list) and all(isinstance(x, float) for x in got)
  np.testing.assert_allclose(got, scorer(prompts, completions, normalized=True), atol=1e-5)
  # Conversational: prompts are message lists, each completion a list holding one assistant message.
  chat_prompts, chat_completions = chat_rows(run["pairs"][:6])
  np.testing.assert_allclose(fn(chat_prompts, chat_completions),
                             scorer(chat_prompts, chat_completions, normalized=True), atol=1e-5)
  with pytest.raises(ValueError, match="6 prompts but 5 completions"):
    fn(prompts, completions[:5])
  if importlib.util.find_spec("trl"):  # TRL names the reward column in its logs after this.
    from trl.trainer import utils as trl_utils  # pylint: disable=g-import-not-at-top
    assert trl_utils.get_callable_name(fn) == "jaxreward_run"
  # Pickled as its arguments: unpickling loads the model again, as the constructor call above did.
  assert len(pickle.dumps(fn)) < 1000
  assert pickle.loads(pickle.dumps(fn.__reduce__())) == (type(fn), (run["workdir"], "best", True, None, None))
