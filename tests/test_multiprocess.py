"""Processes on localhost (one CPU device each, gloo) joined by jax.distributed, on meshes whose tensor groups
span processes, so that several hosts need the same rows of each batch: 4 processes on data=1 x fsdp=2 x
tensor=2, and 2 processes on data=1 x fsdp=1 x tensor=2, train `tiny` to the metrics of one process with as many
devices. Host 0 alone trains the BPE tokenizer. The 2-process job stops together on a SIGTERM to either host
(JAX's preemption sync point), does not hang when a host is killed (the coordination service's heartbeat stops
the rest), and resumes, with a large metrics.jsonl that host 0 alone reads and rewrites, to the metrics of an
uninterrupted run. Both jobs are compared with one single-process run on data=1 x fsdp=2 x tensor=2: with data=1
every mesh trains on the same global batches, and the fsdp split only reorders float sums (measured: 2 vs 4
devices agree to 6e-7), so one reference run serves both (each worker launch is ~30 s of CPU, mostly compiles).
Every subprocess runs under `timeout -s KILL`: after jax.distributed.initialize SIGTERM no longer kills a
process, and a hung collective must not hang the suite. No persistent compilation cache: with a warm one, these
jobs failed to set up gloo ("Gloo context initialization failed: GetKeyValue() timed out")."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags

WORKER = str(ROOT / "tests" / "multiprocess_worker.py")
KILL_AFTER_S = 420
HEARTBEAT_S = 5
# Long enough to interrupt twice; every eval also checkpoints; the stop check and a metrics row come at log_every.
# One bucket and no packing: one train and one eval program to compile per layout (compiling is most of a run).
OVERRIDES = {"train.num_steps": 40, "train.eval_every": 20, "train.log_every": 2, "data.packing": False,
             "data.num_buckets": 1, "distributed.heartbeat_timeout_s": HEARTBEAT_S, "mesh.data": 1, "mesh.tensor": 2}
COMPARED = ("val_accuracy", "val_loss", "train_loss")


def launch(args, fsdp, devices=None):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR="",  # A cache hit on one host and a compile on another time out gloo.
             WORKER_OVERRIDES=json.dumps({**OVERRIDES, "mesh.fsdp": fsdp}))
  return subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, WORKER, *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch_job(workdir, processes=2):
  """One job of `processes` x 1 device, mesh data=1 x fsdp=processes/2 x tensor=2: processes 2i and 2i+1 form
  tensor group i, and both need its rows."""
  port = str(free_port())
  return [launch([str(workdir), str(i), port, str(processes)], processes // 2) for i in range(processes)]


def launch_single(workdir, devices):
  return result(launch([str(workdir), "single"], devices // 2, devices))


def result(proc, expected_rc=0):
  out, err = proc.communicate()
  assert proc.returncode == expected_rc, (f"worker exited {proc.returncode}, expected {expected_rc} "
                                          f"(-9/137: killed at {KILL_AFTER_S} s)\n{err[-3000:]}")
  return json.loads(out.strip().splitlines()[-1])


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for_step(workdir, step, procs, timeout=240):
  """Waits until process 0 logged a training row at or past `step`."""
  path, deadline = workdir / "metrics.jsonl", time.time() + timeout
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a worker ended before it was interrupted"
    if path.exists():
      steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"kind": "train"' in line]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.05)
  raise AssertionError(f"no progress to step {step} in {timeout} s")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """The uninterrupted single-process reference: 4 devices, mesh data=1 x fsdp=2 x tensor=2."""
  return launch_single(tmp_path_factory.mktemp("single"), 4)


def test_four_processes_on_spanning_tensor_groups_equal_one_process(tmp_path, single):
  four = [result(w) for w in launch_job(tmp_path / "four", processes=4)]

  assert [(m["process_index"], m["process_count"], m["devices"]) for m in four] == [(i, 4, 4) for i in range(4)]
  assert (single["process_count"], single["devices"]) == (1, 4)
  assert "data=1 x fsdp=2 x tensor=2 on 4 cpu device(s), 4 process(es)" in four[0]["mesh"], four[0]["mesh"]
  # Only process 0 writes the summary; every process computes the same (replicated) metrics.
  with open(tmp_path / "four" / "metrics.json") as f:
    written = json.load(f)
  for key in COMPARED:
    assert written[key] == four[0][key] and len({m[key] for m in four}) == 1, key
    np.testing.assert_allclose(four[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # The BPE is trained once per job, on host 0; the others loaded its copy, which is gone once all had it.
  assert [m["bpe_trained"] for m in four] == [1, 0, 0, 0] and single["bpe_trained"] == 1
  assert (tmp_path / "four" / "tokenizer" / "tokenizer.json").is_file()
  assert not (tmp_path / "four" / "tokenizer.trained").exists()


def test_sigterm_stops_all_kill_9_does_not_hang_and_resume_reads_metrics_on_host_0(tmp_path, single):
  workdir = tmp_path / "interrupted"

  # A preemption notice reaches one host only: the preemption service picks a step, and both stop there.
  procs = launch_job(workdir)
  wait_for_step(workdir, 4, procs)
  procs[1].send_signal(signal.SIGTERM)  # `timeout` passes it on to the worker.
  stopped = [result(p, expected_rc=4) for p in procs]
  assert stopped[0]["stopped_at"] == stopped[1]["stopped_at"] < OVERRIDES["train.num_steps"], stopped

  # The coordinator host dies without a word: the other one must not wait in a collective until the end of time.
  procs = launch_job(workdir)
  wait_for_step(workdir, stopped[0]["stopped_at"] + 4, procs)
  # The Popen is `timeout`; its child is the worker itself.
  os.kill(int(subprocess.check_output(["pgrep", "-P", str(procs[0].pid)]).split()[0]), signal.SIGKILL)
  killed_at = time.time()
  _, err = procs[1].communicate()
  waited = time.time() - killed_at
  assert procs[1].returncode not in (0, 4, -9, 137), err[-2000:]  # Stopped by the service, not by `timeout`.
  assert waited < HEARTBEAT_S + 45, waited
  assert "stopped sending heartbeats" in err or "another task died" in err, err[-2000:]
  procs[0].communicate()

  # A long history past the last checkpoint (~12 MB), as a long run leaves: host 0 reads and rewrites it while
  # the other host waits for its rows, so no host can read it half rewritten.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.writelines(json.dumps({"kind": "train", "step": 10_000 + i, "loss": 0.5, "note": "x" * 80}) + "\n"
                 for i in range(100_000))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "step": 99')  # The last write of a killed process, cut short.

  # Re-running both resumes from the last complete checkpoint and ends where an uninterrupted run ends.
  resumed = [result(p) for p in launch_job(workdir)]
  assert [m["bpe_trained"] for m in resumed] == [1, 0] and "2 process(es)" in resumed[0]["mesh"]
  for key in COMPARED:
    assert resumed[0][key] == resumed[1][key], key
    np.testing.assert_allclose(resumed[0][key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == OVERRIDES["train.num_steps"] and len(steps) < 100, steps[-5:]  # The rows past it are gone.
