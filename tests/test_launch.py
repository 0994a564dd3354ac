"""launch/*.sh in --dry-run: the exact commands they would run, and one-line errors (exit 2) on bad arguments."""

import os
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
  create, archive, scp, install, start, follow, status, delete = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rm-8b"]
  for flags in (["--zone", "us-east5-a"], ["--accelerator-type", "v5p-64"], ["--version", "v2-alpha-tpuv5"],
                ["--project", "my-proj"], ["--spot"]):
    assert " ".join(flags) in " ".join(create), flags
  assert archive[:2] == ["git", "archive"] and scp[4] == "scp" and "--worker=all" in scp
  assert install[4:6] == ["ssh", "rm-8b"] and "--worker=all" in install and "--zone" in install
  # jax pinned: its [tpu] extra pins the matching libtpu, so every worker and every re-run has the same stack.
  assert "pip install -q -e ~/jaxreward 'jax[tpu]==0.10.2'" in install[install.index("--command") + 1]
  for cmd in (start, follow, status):
    assert cmd[4:6] == ["ssh", "rm-8b"] and "--worker=all" in cmd
  # Training is started detached on every worker (launch/tpu_worker.sh: setsid nohup), so a dropped ssh session
  # cannot kill it; the launcher then streams the logs and reads back every worker's exit code.
  remote = shlex.split(start[start.index("--command") + 1])
  assert remote[:5] == ["cd", "~/jaxreward", "&&", "launch/tpu_worker.sh", "start"]
  main = remote[remote.index("--") + 1:]
  assert main[:4] == ["--config", "configs/large.py", "--workdir", "/mnt/shared/runs/large"]
  assert "--config.distributed.initialize=yes" in main  # Cloud TPU VMs are not detected from the environment.
  assert "--config.train.compilation_cache=/mnt/shared/runs/xla_cache" in main  # Shared: re-runs skip compiling.
  assert main[-1] == "--config.model.init_from=/mnt/shared/llama 3"  # Survives both shells with its space.
  assert shlex.split(follow[follow.index("--command") + 1])[-1] == "follow"
  assert follow[-5:] == ["2>&1", "|", "tee", "-a", "logs/rm-8b.log"]  # Every worker's output is streamed and kept.
  assert shlex.split(status[status.index("--command") + 1])[-1] == "status"
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rm-8b"] and "--quiet" in delete
  assert "us-east5-a" in delete


def test_tpu_vm_quotes_paths_and_takes_the_cache_and_jax_version():
  args = [a if a != "/mnt/shared/runs/large" else "/mnt/my runs/large" for a in TPU]
  rc, stdout, _ = launch("tpu_vm.sh", "--dry-run", *args, "--compile-cache", "none", "--jax-version", "0.10.1")
  assert rc == 0
  _, _, _, install, start, *_ = commands(stdout)
  assert "'jax[tpu]==0.10.1'" in install[install.index("--command") + 1]
  main = shlex.split(start[start.index("--command") + 1])
  assert main[main.index("--workdir") + 1] == "/mnt/my runs/large"
  assert not any("compilation_cache" in w for w in main)


def test_tpu_vm_attach_follows_and_collects_without_creating():
  rc, stdout, _ = launch("tpu_vm.sh", "--dry-run", "--attach", "--name", "rm-8b", "--zone", "us-east5-a", "--keep")
  assert rc == 0
  cmds = commands(stdout.replace("kept rm-8b", "+ kept"))
  assert [shlex.split(c[c.index("--command") + 1])[-1] for c in cmds[:2]] == ["follow", "status"]
  assert cmds[2][0].startswith("kept") and [c[4] for c in cmds[:2]] == ["ssh", "ssh"] and len(cmds) == 3


def test_tpu_worker_runs_detached_and_reports_its_exit_code(tmp_path):
  fake_python = tmp_path / "python"
  fake_python.write_text("#!/usr/bin/env bash\necho \"args: $*\"; echo \"sid $(ps -o sid= -p $$)\"\n"
                         "sleep 1; exit 4\n")
  fake_python.chmod(0o755)
  env = dict(os.environ, JAXREWARD_RUN_DIR=str(tmp_path / "run"), JAXREWARD_PYTHON=str(fake_python))

  def worker(*args):
    return subprocess.run(["bash", "launch/tpu_worker.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)

  started = worker("start", "--", "--workdir", "a b")
  assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
  assert worker("status").stdout.strip().endswith("running")
  again = worker("start", "--", "--workdir", "a b")
  assert again.returncode == 2 and "already runs" in again.stderr  # One training per worker.
  followed = worker("follow")
  assert followed.returncode == 4  # The training's own exit code (4: preempted) reaches the launcher.
  assert "args: -m jaxreward.main --workdir a b" in followed.stdout
  sid = int(followed.stdout.split("sid")[1].split()[0])
  assert sid != os.getsid(0)  # Its own session: no SIGHUP when the ssh session that started it drops.
  assert worker("status").stdout.strip().endswith("exit 4")


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
  assert install == [".venv-gpu/bin/pip", "install", "-q", "-e", ".", "jax[cuda12]==0.10.2"]
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
