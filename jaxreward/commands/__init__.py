"""Command lines over the library modules: `evaluate`, `score`, `export` (training is `jaxreward.main`).

One style: absl flags everywhere, because `jaxreward.main` needs them (its --config.SECTION.KEY=VALUE overrides
are ml_collections config_flags, which are absl flags) and the tools already use them. Each command defines
its flags on its own `FlagValues`, so several commands can share one process (the tests call `main(argv)`,
which returns the exit code instead of exiting), and a bad flag is one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxreward import configuration


def parse(flag_values: flags.FlagValues, argv: list[str] | None, usage: str,
          positional: tuple[str, ...] = ()) -> list[str] | int:
  """The positional arguments (exactly the names in `positional`) left after parsing `argv` (default
  sys.argv[1:]), or an exit code to return: 0 after printing the help, 2 after a one-line error."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--help" in argv or "-h" in argv:
    print(usage.strip() + "\n\n" + flag_values.get_help(include_special_flags=False))
    return configuration.EXIT_OK
  flag_values.unparse_flags()  # Earlier calls in this process must not leave their values behind.
  try:
    rest = flag_values(["jaxreward"] + argv)[1:]
  except flags.Error as e:
    return fail(e)
  if len(rest) != len(positional):
    return fail(f"expected {' and '.join(positional) if positional else 'no positional arguments'}, got {rest}")
  return rest


def fail(error) -> int:
  print(f"error: {error}", file=sys.stderr)
  return configuration.EXIT_BAD_INPUT
