"""python -m jaxreward.commands.evaluate --workdir W --data FILE [--checkpoint best|latest|STEP] [--out DIR]

Error analysis of a reward model on a preference file. W is a jaxreward work dir or an exported HF folder.
Writes report.json, summary.txt and reliability.png to DIR (default W/eval/<data file name>).
Exit codes: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

from jaxreward import allocator

if __name__ == "__main__":
  allocator.reexec()  # Before JAX and the rest are imported: the second start then costs only Python's.

import sys

from absl import flags

from jaxreward import checkpoint, commands, configuration, evaluate, hosts

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "a jaxreward work dir or an exported HF folder", flag_values=FLAGS)
flags.DEFINE_string("data", None, "preference pairs (explicit, implicit or conversational)", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "best", "best | latest | STEP (work dir only)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder (default WORKDIR/eval/<data name>)", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "data"], flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, __doc__)
  if isinstance(rest, int):
    return rest
  try:
    result = evaluate.evaluate_file(FLAGS.workdir, FLAGS.data, checkpoint.parse_which(FLAGS.checkpoint), FLAGS.out)
  except configuration.ConfigError as e:
    return commands.fail(e)
  if hosts.is_main():
    print(evaluate.summary_text(result), end="")
    print(f"wrote {result['out_dir']}/report.json, summary.txt, reliability.png")
  return configuration.EXIT_OK


def run() -> None:
  allocator.reexec()  # The installed script (pyproject [project.scripts]) enters here; a no-op under -m.
  sys.exit(main())


if __name__ == "__main__":
  run()
