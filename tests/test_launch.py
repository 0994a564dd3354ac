"""launch/*.sh in --dry-run: the exact commands they would run, and one-line errors (exit 2) on bad arguments."""

import shlex
import subprocess

import pytest

from tests.conftest import ROOT


def launch(script, *args):
  out = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  return out.returncode, out.stdout, out.stderr


def commands(stdout):
  """Each printed '+ cmd' line split into words as a shell would (a trailing '| tee' stays in the words)."""
  lines = stdout.strip().splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), stdout
  return [shlex.split(line[2:]) for line in lines]


TPU = ["--name", "rm-8b", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--config", "configs/large.py",
       "--workdir", "/mnt/shared/runs/large"]


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  rc, stdout, stderr = launch("tpu_vm.sh", "--dry-run", *TPU, "--project", "my-proj", "--spot", "--",
                              "--config.model.init_from=/mnt/shared/llama 3")
  assert rc == 0 and not stderr
  cmds = commands(stdout)
  create, archive, scp, install, train, delete = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rm-8b"]
  for flags in (["--zone", "us-east5-a"], ["--accelerator-type", "v5p-64"], ["--version", "v2-alpha-tpuv5"],
                ["--project", "my-proj"], ["--spot"]):
    assert " ".join(flags) in " ".join(create), flags
  assert archive[:2] == ["git", "archive"] and scp[4] == "scp" and "--worker=all" in scp
  assert install[4:6] == ["ssh", "rm-8b"] and "--worker=all" in install and "--zone" in install
  assert "pip install -q -e ~/jaxreward 'jax[tpu]'" in install[install.index("--command") + 1]
  assert train[4:6] == ["ssh", "rm-8b"] and "--worker=all" in train
  remote = shlex.split(train[train.index("--command") + 1])
  main = remote[remote.index("-m"):]
  assert main[:6] == ["-m", "jaxreward.main", "--config", "configs/large.py", "--workdir", "/mnt/shared/runs/large"]
  assert main[6] == "--config.model.init_from=/mnt/shared/llama 3"  # Survives both shells with its space.
  assert train[-3:] == ["|", "tee", "logs/rm-8b.log"]  # Every worker's output is streamed and kept.
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rm-8b"] and "--quiet" in delete
  assert "us-east5-a" in delete


@pytest.mark.parametrize("accelerator,version", [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_tpu_vm_runtime_follows_the_accelerator(accelerator, version):
  args = list(TPU)
  args[args.index("v5p-64")] = accelerator
  rc, stdout, _ = launch("tpu_vm.sh", "--dry-run", *args)
  assert rc == 0
  create = commands(stdout)[0]
  assert create[create.index("--version") + 1] == version and "--spot" not in create
  rc, stdout, _ = launch("tpu_vm.sh", "--dry-run", *args, "--version", "my-runtime", "--keep")
  cmds = commands(stdout.replace("kept rm-8b", "+ kept"))
  assert cmds[0][cmds[0].index("--version") + 1] == "my-runtime"
  assert not any("delete" in c for c in cmds[:-1]) and "--delete" in stdout  # --keep: tells how, does not delete.


def test_tpu_vm_delete_only():
  rc, stdout, _ = launch("tpu_vm.sh", "--dry-run", "--delete", "--name", "rm-8b", "--zone", "us-central2-b")
  assert rc == 0
  assert commands(stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "rm-8b", "--zone", "us-central2-b",
                               "--quiet"]]


def test_gpu_dry_run():
  rc, stdout, stderr = launch("gpu.sh", "--dry-run", "--config", "configs/medium.py", "--workdir", "runs/medium",
                              "--", "--config.train.batch_size=16")
  assert rc == 0 and not stderr
  venv, install, check, estimate, train = commands(stdout)
  assert venv == ["python3.11", "-m", "venv", ".venv-gpu"]
  assert install == [".venv-gpu/bin/pip", "install", "-q", "-e", ".", "jax[cuda12]"]
  assert "jax.default_backend() == 'gpu'" in check[-1]
  assert estimate[1:] == ["tools/memory.py", "--config", "configs/medium.py", "--config.train.batch_size=16"]
  assert train == [".venv-gpu/bin/python", "-m", "jaxreward.main", "--config", "configs/medium.py", "--workdir",
                   "runs/medium", "--config.train.batch_size=16"]
  rc, stdout, _ = launch("gpu.sh", "--dry-run", "--skip-install", "--cuda", "13", "--config", "configs/small.py",
                         "--workdir", "runs/small")
  assert rc == 0 and [c[1] for c in commands(stdout)] == ["-c", "tools/memory.py", "-m"]


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", [a for a in TPU if a not in ("--name", "rm-8b")], "--name is required"),
    ("tpu_vm.sh", ["--name", "RM_8b"] + TPU[2:], "--name 'RM_8b'"),
    ("tpu_vm.sh", TPU[:2] + TPU[4:], "--zone is required"),
    ("tpu_vm.sh", TPU[:2] + ["--zone", "useast"] + TPU[4:], "--zone 'useast'"),
    ("tpu_vm.sh", TPU[:5] + ["v3-8"] + TPU[6:], "--accelerator-type 'v3-8'"),
    ("tpu_vm.sh", TPU[:6] + ["--config", "configs/nope.py"] + TPU[8:], "'configs/nope.py' does not exist"),
    ("tpu_vm.sh", TPU[:8], "--workdir is required"),
    ("tpu_vm.sh", TPU + ["--zone"], "--zone needs a value"),
    ("tpu_vm.sh", TPU + ["--bogus"], "unknown argument '--bogus'"),
    ("gpu.sh", ["--workdir", "w"], "--config is required"),
    ("gpu.sh", ["--config", "configs/medium.py"], "--workdir is required"),
    ("gpu.sh", ["--config", "configs/medium.py", "--workdir", "w", "--cuda", "11"], "--cuda '11'"),
    ("gpu.sh", ["--config", "x.py", "--workdir", "w"], "'x.py' does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(script, args, message):
  rc, stdout, stderr = launch(script, "--dry-run", *args)
  assert rc == 2 and not stdout
  assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and message in stderr, stderr
