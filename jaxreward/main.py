"""Command line: `python -m jaxreward.main --config configs/small.py --workdir runs/small [--config.x.y=v]`.

Exit codes: 0 gate passed, 3 gate failed, 2 bad config or input (one line on stderr), 4 preempted, 1 crash.
"""

from jaxreward import allocator

if __name__ == "__main__":
  allocator.reexec()  # Before JAX and the rest are imported: the second start then costs only Python's.

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxreward import configuration, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output folder; re-running with it resumes.")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; settings go through --config.SECTION.KEY=VALUE", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO through absl.
  try:
    config = _CONFIG.value
    config.keys()  # A config file that failed to load only says so when first used.
  except Exception as e:  # pylint: disable=broad-except  (a config file's get_config may raise anything)
    print(f"error: bad config {flags.FLAGS['config'].config_filename}: {type(e).__name__}: {one_line(e)}",
          file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_CRASH)
  except OSError as e:  # Writing the work dir: disk full, quota, read-only, permissions.
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or one_line(e)}; free space or fix the folder, then re-run the same command "
          "(it resumes from the last complete checkpoint)", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  if summary.get("preempted"):
    sys.exit(configuration.EXIT_PREEMPTED)
  sys.exit(configuration.EXIT_OK if summary["gate_pass"] else configuration.EXIT_GATE_FAILED)


def one_line(error: Exception) -> str:
  text = str(error).strip("'\"").replace("\\n", "\n")
  return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def parse_flags(argv):
  """absl's parser, with a bad config file or override reported as one line instead of a traceback."""
  try:
    configuration.check_overrides(argv)
    return flags.FLAGS(argv)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  except flags.Error as e:
    message = one_line(_without_traceback(str(e)))
  except Exception as e:  # pylint: disable=broad-except  (a config file runs arbitrary code while parsed)
    message = f"{_config_file(argv)}: {type(e).__name__}: {one_line(e)}"
  print(f"error: bad flags or config: {message}", file=sys.stderr)
  sys.exit(configuration.EXIT_BAD_INPUT)


def _config_file(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return _CONFIG.default if hasattr(_CONFIG, "default") else "config file"


def _without_traceback(message: str) -> str:
  """absl pastes a config file's whole traceback into its error; keep the head and the exception's line."""
  head, sep, tail = message.partition("Traceback (most recent call last):")
  if not sep:
    return message
  last = [line for line in tail.splitlines() if line.strip()][-1:]
  return head.strip() + " " + " ".join(last)


def run() -> None:
  allocator.reexec()  # The installed script (pyproject [project.scripts]) enters here; a no-op under -m.
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
