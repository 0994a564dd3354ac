"""Command line: `python -m jaxreward.main --config configs/small.py --workdir runs/small [--config.x.y=v]`.

Exit codes: 0 gate passed, 3 gate failed, 2 bad config or input (one line on stderr), 4 preempted, 1 crash.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxreward import configuration

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Run configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output folder; re-running with it resumes.")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; settings go through --config.SECTION.KEY=VALUE", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  from jaxreward import train  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_CRASH)
  sys.exit(configuration.EXIT_OK if summary["gate_pass"] else configuration.EXIT_GATE_FAILED)


if __name__ == "__main__":
  app.run(main)
