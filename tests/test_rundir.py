"""The work dir's identity and lock: a re-run that is another run refuses, and so does a second live run."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from jaxreward import configuration, rundir
from tests.conftest import ROOT, load_config, xla_flags

ARGS = ["--config.mesh.data=1", "--config.train.num_steps=4", "--config.train.eval_every=2"]


def cli(workdir, *args, timeout=240):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  return subprocess.run([sys.executable, "-m", "jaxreward.main", "--config", str(ROOT / "configs/tiny.py"),
                         "--workdir", str(workdir), *ARGS, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def tree(folder):
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == configuration.EXIT_BAD_INPUT, result.stderr[-3000:]
  assert lines[-1].startswith("error:") and "Traceback" not in result.stderr, result.stderr[-3000:]
  return lines[-1]


def test_identity_names_settings_and_file_contents(tmp_path):
  data = tmp_path / "pairs.jsonl"
  data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
  config = load_config("tiny")
  config.data.train_path = str(data)
  before = rundir.identity(config)
  config.train.seed = 3
  config.train.eval_every = 7  # Evaluation cadence is not part of the run's identity.
  data.write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')
  diffs = {key: shapes for key, _, shapes in rundir.differences(before, rundir.identity(config))}
  assert diffs == {"train.seed": False, "data.train_path": False}
  config.model.hidden_size = 64
  assert dict((k, s) for k, _, s in rundir.differences(before, rundir.identity(config)))["model.hidden_size"]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
  messages = []
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    holder = {"pid": sleeper.pid, "host": __import__("socket").gethostname(), "started": "now"}
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(configuration.ConfigError, match=f"in use by another run \\(pid {sleeper.pid}"):
      rundir.Lock(str(tmp_path)).acquire(messages.append)
  finally:
    sleeper.kill()
    sleeper.wait()
  lock = rundir.Lock(str(tmp_path))
  lock.acquire(messages.append)
  assert f"took over the lock of pid {sleeper.pid}" in messages[-1]
  assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert os.listdir(tmp_path) == []


def refused(workdir, config=None, **changes):
  """The one-line refusal of opening `workdir` for tiny's config with `changes` ({"train.seed": 1, ...})."""
  config = config or load_config("tiny")
  config.mesh.data = 1
  config.train.num_steps, config.train.eval_every = 4, 2
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(configuration.ConfigError) as err:
    rundir.open_run(str(workdir), config, print)
  assert "\n" not in str(err.value)
  return str(err.value)


def test_unusable_work_dirs_refuse_in_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  assert "is a file; expected a folder" in refused(tmp_path / "file")
  assert "cannot create it (Not a directory)" in refused(tmp_path / "file" / "run")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "README.md").write_text("my notes")
  assert "holds README.md but no run.json" in refused(tmp_path / "mine")
  assert os.listdir(tmp_path / "mine") == ["README.md"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "w"
  result = cli(workdir)
  assert result.returncode in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), result.stderr[-3000:]
  assert (workdir / rundir.IDENTITY_FILE).exists() and not (workdir / rundir.LOCK_FILE).exists()
  return workdir


def test_another_run_refuses_in_one_line_exit_2_and_changes_nothing(finished):
  before = tree(finished)
  assert ("holds another run: train.seed 0 -> 1; use a new --workdir, or --config.train.resume=force"
          in error_line(cli(finished, "--config.train.seed=1")))
  assert tree(finished) == before


@pytest.mark.parametrize("changes,message", [
    ({"data.validation_fraction": 0.3, "train.learning_rate": 0.01},
     "data.validation_fraction 0.2 -> 0.3; train.learning_rate 0.001 -> 0.01;"),
    ({"model.hidden_size": 64, "train.resume": "force"},
     "the model's shapes differ (model.hidden_size), so its checkpoints cannot be continued"),
    ({"data.synthetic_pairs": 500}, "data.synthetic_pairs 400 -> 500"),
])
def test_each_difference_is_named(finished, changes, message):
  before = tree(finished)
  assert message in refused(finished, **changes)
  assert tree(finished) == before


def test_live_run_refuses_a_second_one(finished):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (finished / rundir.LOCK_FILE).write_text(json.dumps(
        {"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "now"}))
    before = tree(finished)
    assert f"is in use by another run (pid {holder.pid}" in refused(finished)
    assert tree(finished) == before
  finally:
    holder.kill()
    holder.wait()
    os.remove(finished / rundir.LOCK_FILE)


def test_forced_resume_is_recorded_in_the_card(finished):
  result = cli(finished, "--config.train.seed=1", "--config.train.resume=force")
  assert result.returncode in (configuration.EXIT_OK, configuration.EXIT_GATE_FAILED), result.stderr[-3000:]
  assert "resuming" in result.stderr and "by force despite: train.seed 0 -> 1" in result.stderr
  card = (finished / "README.md").read_text()
  assert "## Forced resumes" in card and "at step 4" in card and "train.seed 0 -> 1" in card
  # The forced settings are now the run's own: opening it with them passes without force.
  config = load_config("tiny")
  config.mesh.data, config.train.num_steps, config.train.eval_every, config.train.seed = 1, 4, 2, 1
  rundir.open_run(str(finished), config, print).release()
