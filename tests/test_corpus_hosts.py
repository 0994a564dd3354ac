"""Host-sharded tokenization (corpus.encode_across_hosts): 2 processes on localhost (gloo, one CPU device each),
each tokenizing only its block of the pairs, end with the same Encoded as one process tokenizing all of them.
Every process runs under `timeout -s KILL` (after jax.distributed.initialize SIGTERM no longer ends it)."""

import json
import os
import subprocess
import sys

import pytest

from jaxreward import corpus
from tests import tokenize_worker
from tests.conftest import ROOT, xla_flags
from tests.test_multiprocess import free_port

WORKER = str(ROOT / "tests" / "tokenize_worker.py")
KILL_AFTER_S = 180


def run(workdir, processes, *extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR="")
  port = str(free_port())
  modes = ["single"] if processes == 1 else [str(i) for i in range(processes)]
  procs = [subprocess.Popen(["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, WORKER, str(workdir), mode,
                             port, str(processes), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for mode in modes]
  out = []
  for proc in procs:
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"worker exited {proc.returncode} (-9/137: killed)\n{stderr[-3000:]}"
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def test_two_hosts_tokenize_half_each_and_agree_with_one(tmp_path):
  prepared = corpus.prepare(tokenize_worker.make_config(), lambda message: None, str(tmp_path / "one"))
  pairs = len(prepared.train) + len(prepared.validation)  # tiny: no pair is dropped, so all were tokenized.
  hosts = run(tmp_path / "two", 2)
  for host in hosts:
    assert host["train"] == tokenize_worker.digest(prepared.train), host["process_index"]
    assert host["validation"] == tokenize_worker.digest(prepared.validation), host["process_index"]
  # Each host passed only its block to the tokenizer: together every pair once, about half each.
  assert sum(h["pairs_tokenized"] for h in hosts) == pairs
  for host in hosts:
    assert abs(host["pairs_tokenized"] - pairs / 2) <= 2
  assert not (tmp_path / "two" / corpus.STAGED_TOKENS).exists()


@pytest.mark.skipif(not os.environ.get("JAXREWARD_BENCH"), reason="a measurement: set JAXREWARD_BENCH=1")
@pytest.mark.parametrize("name", ["ethics_util_train", "autoj_hh_style"])
def test_tokenization_time_one_vs_two_hosts(tmp_path, name):
  from tests.conftest import require_shared_data  # pylint: disable=g-import-not-at-top
  path = str(require_shared_data() / f"{name}.jsonl")
  (single,) = run(tmp_path / "one", 1, "small", path)
  hosts = run(tmp_path / "two", 2, "small", path)
  assert all(h["train"] == single["train"] for h in hosts)
  print(f"\n{name}: {single['pairs']} pairs; encode {single['encode_s']:.2f} s on 1 process, "
        f"{max(h['encode_s'] for h in hosts):.2f} s on 2 ({[h['pairs_tokenized'] for h in hosts]} pairs each)")
