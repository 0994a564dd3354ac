"""One process of the multi-process tests (tests/test_multiprocess.py); also the single-process reference run.

  python tests/multiprocess_worker.py WORKDIR PROCESS_ID PORT [PROCESSES]  # one of PROCESSES (2), one CPU device each
  python tests/multiprocess_worker.py WORKDIR single                      # 1 process; XLA_FLAGS gives it its devices

Config overrides come as JSON in $WORKER_OVERRIDES ({"train.num_steps": 60, ...}). Prints the run's summary as one JSON line on stdout; a preempted run prints
{"stopped_at": STEP, ...} and exits 4 like the CLI.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from tests.conftest import load_config  # pylint: disable=g-import-not-at-top


def main(workdir, mode, port=None, processes="2"):
  config = load_config("tiny")
  config.mesh.data = -1  # Every device on the data axis unless the overrides say otherwise.
  for dotted, value in json.loads(os.environ.get("WORKER_OVERRIDES", "{}")).items():
    section, key = dotted.split(".")
    config[section][key] = value
  if mode != "single":
    # One device per process: with several, gloo on CPU can deadlock creating its contexts (seen with 2 x 2).
    jax.config.update("jax_num_cpu_devices", 1)
    config.distributed.initialize = "yes"
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = int(processes)
    config.distributed.process_id = int(mode)
  from jaxreward import tokenizer, train  # pylint: disable=g-import-not-at-top
  trained = []  # How many BPE tokenizers this process trained (host 0 alone should).
  train_bpe = tokenizer.train_bpe
  tokenizer.train_bpe = lambda *args: trained.append(1) or train_bpe(*args)
  summary = train.train_and_evaluate(config, workdir)
  head = {"process_index": jax.process_index(), "process_count": jax.process_count(), "devices": jax.device_count(),
          "bpe_trained": len(trained)}
  if summary.get("preempted"):
    print(json.dumps({**head, "stopped_at": summary["stopped_at"]}), flush=True)
    sys.exit(4)
  print(json.dumps({**head, **{k: summary[k] for k in ("val_accuracy", "val_loss", "train_loss", "mesh")}}),
        flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
