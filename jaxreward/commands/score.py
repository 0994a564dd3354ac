"""python -m jaxreward.commands.score --model W_or_HF_folder --data FILE --out FILE [--checkpoint best|latest|STEP]

Scores {prompt, response} rows or preference pairs with a trained reward model (see jaxreward/score.py for
the file formats and the normalisation); writes JSONL and prints a one-line JSON summary.
Exit codes: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

from jaxreward import allocator

if __name__ == "__main__":
  allocator.reexec()  # Before JAX and the rest are imported: the second start then costs only Python's.

import json
import os
import sys

from absl import flags

from jaxreward import checkpoint, commands, configuration, outputs, score, storage
from jaxreward.configuration import ConfigError

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "a jaxreward work dir or an exported HF folder", flag_values=FLAGS)
flags.DEFINE_string("data", None, "JSONL/JSON of {prompt, response} rows or preference pairs", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output JSONL", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", "best", "work dir only: best | latest | STEP", flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "override the scoring max length", flag_values=FLAGS)
flags.mark_flags_as_required(["model", "data", "out"], flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, __doc__)
  if isinstance(rest, int):
    return rest
  try:
    which = checkpoint.parse_which(FLAGS.checkpoint)
    score.check_model_path(FLAGS.model)
    outputs.check_file(FLAGS.out)
    if not storage.is_remote(FLAGS.out) and os.path.exists(FLAGS.out) and os.path.samefile(FLAGS.out, FLAGS.data):
      raise ConfigError(f"--out {FLAGS.out} is the --data file; write the scores elsewhere")
    score.read_rows(FLAGS.data)  # Fail on a bad file before spending time loading the model.
    scorer = score.load_scorer(FLAGS.model, which, FLAGS.max_length)
    out, summary = score.score_file(scorer, FLAGS.data)
    storage.write_atomically(FLAGS.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out))
  except ConfigError as e:
    return commands.fail(e)
  except OSError as e:
    return commands.fail(f"--out {FLAGS.out}: {e.strerror or e}")
  if summary.get("normalized_mean") is None:
    print(f"warning: {FLAGS.model} has no saved validation reward mean/std; reward_normalized is null",
          file=sys.stderr)
  print(json.dumps(summary))
  return configuration.EXIT_OK


def run() -> None:
  allocator.reexec()  # The installed script (pyproject [project.scripts]) enters here; a no-op under -m.
  sys.exit(main())


if __name__ == "__main__":
  run()
