"""Converts preference JSONL (or .json / .jsonl.gz) into a TFDS dataset that `data.source = "tfds"` reads.

  python tools/jsonl_to_tfds.py pairs.jsonl /data/tfds --name my_prefs [--validation val.jsonl]
  python -m jaxreward.main --config configs/small.py --workdir runs/x \
      --config.data.source=tfds --config.data.tfds_name=my_prefs --config.data.tfds_data_dir=/data/tfds

Lines are read and checked exactly as training reads them (all three formats; bad lines stop the
conversion with `file:line`, or are skipped with --on_bad_line=skip). The layout is documented in
jaxreward/tfds_data.py. Exit status 2 with one line on stderr for bad input.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxreward import commands, configuration, data, tfds_data

USAGE = "python tools/jsonl_to_tfds.py INPUT DATA_DIR --name NAME [--validation FILE]"
FLAGS = flags.FlagValues()
flags.DEFINE_string("name", None, "dataset name, snake_case", flag_values=FLAGS)
flags.DEFINE_string("validation", "", "optional validation pairs (becomes the validation split)", flag_values=FLAGS)
flags.DEFINE_enum("format", "auto", ["auto", "explicit", "implicit", "conversational"], "input format",
                  flag_values=FLAGS)
flags.DEFINE_enum("on_bad_line", "error", ["error", "skip"], "stop at a bad line, or skip it", flag_values=FLAGS)
flags.mark_flags_as_required(["name"], flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, USAGE + "\n\n" + __doc__, positional=("INPUT", "DATA_DIR"))
  if isinstance(rest, int):
    return rest
  source, data_dir = rest
  try:
    splits = {}
    for split, path in (("train", source), ("validation", FLAGS.validation)):
      if path:
        pairs, report = data.load_pairs(path, FLAGS.format, FLAGS.on_bad_line)
        splits[split] = pairs
        skipped = f"; skipped {report.skipped}: {'; '.join(report.skip_reasons[:3])}" if report.skipped else ""
        print(f"{split}: {len(pairs)} pairs from {path} ({dict(report.formats)}){skipped}", file=sys.stderr)
    out = tfds_data.write(FLAGS.name, data_dir, splits)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return configuration.EXIT_BAD_INPUT
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
