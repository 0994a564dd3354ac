"""One process of the multi-process tests (tests/test_multiprocess.py); also the single-process reference run.

  python tests/multiprocess_worker.py WORKDIR PROCESS_ID PORT [PROCESSES [DEVICES]]  # one of PROCESSES (2) with
                                                                                     # DEVICES CPU devices (1)
  python tests/multiprocess_worker.py WORKDIR single                                 # 1 process; XLA_FLAGS gives
                                                                                     # it its devices

Config overrides come as JSON in $WORKER_OVERRIDES ({"train.num_steps": 60, ...}). $WORKER_INTERLEAVE=1 orders
the mesh's devices local index first ([p0d0, p1d0, p0d1, p1d1]), as a pod's topology may: each tensor group
then spans processes. Prints the run's summary as one JSON line on stdout; a preempted run prints
{"stopped_at": STEP, ...} and exits 4 like the CLI.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from tests.conftest import load_config  # pylint: disable=g-import-not-at-top


def main(workdir, mode, port=None, processes="2", devices="1"):
  config = load_config("tiny")
  config.mesh.data = -1  # Every device on the data axis unless the overrides say otherwise.
  for dotted, value in json.loads(os.environ.get("WORKER_OVERRIDES", "{}")).items():
    section, key = dotted.split(".")
    config[section][key] = value
  if mode != "single":
    jax.config.update("jax_num_cpu_devices", int(devices))
    config.distributed.initialize = "yes"
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = int(processes)
    config.distributed.process_id = int(mode)
  from jaxreward import sharding, train  # pylint: disable=g-import-not-at-top
  if os.environ.get("WORKER_INTERLEAVE") == "1":
    make_mesh = sharding.make_mesh

    def interleaved(mesh_cfg, devices=None):
      devices = devices or jax.devices()
      local = {d: [e for e in devices if e.process_index == d.process_index].index(d) for d in devices}
      return make_mesh(mesh_cfg, sorted(devices, key=lambda d: (local[d], d.process_index)))

    sharding.make_mesh = interleaved
  summary = train.train_and_evaluate(config, workdir)
  head = {"process_index": jax.process_index(), "process_count": jax.process_count(), "devices": jax.device_count()}
  if summary.get("preempted"):
    print(json.dumps({**head, "stopped_at": summary["stopped_at"]}), flush=True)
    sys.exit(4)
  print(json.dumps({**head, **{k: summary[k] for k in ("val_accuracy", "val_loss", "train_loss", "mesh")}}),
        flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
