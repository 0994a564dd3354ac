"""Converts preference JSONL (or .json / .jsonl.gz) into a TFDS dataset that `data.source = "tfds"` reads.

  python tools/jsonl_to_tfds.py pairs.jsonl /data/tfds --name my_prefs [--validation val.jsonl]
  python -m jaxreward.main --config configs/small.py --workdir runs/x \
      --config.data.source=tfds --config.data.tfds_name=my_prefs --config.data.tfds_data_dir=/data/tfds

Lines are read and checked exactly as training reads them (all three formats; bad lines stop the
conversion with `file:line`, or are skipped with --on_bad_line=skip). The layout is documented in
jaxreward/tfds_data.py. Exit status 2 with one line on stderr for bad input.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxreward import configuration, data, tfds_data  # pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("input", help="training pairs: .jsonl, .jsonl.gz or .json array")
  parser.add_argument("data_dir", help="TFDS data_dir to write into (the dataset lands in DATA_DIR/NAME/1.0.0)")
  parser.add_argument("--name", required=True, help="dataset name, snake_case")
  parser.add_argument("--validation", default="", help="optional validation pairs (becomes the validation split)")
  parser.add_argument("--format", default="auto", choices=("auto", "explicit", "implicit", "conversational"))
  parser.add_argument("--on_bad_line", default="error", choices=("error", "skip"))
  args = parser.parse_args(argv)
  try:
    splits = {}
    for split, path in (("train", args.input), ("validation", args.validation)):
      if path:
        pairs, report = data.load_pairs(path, args.format, args.on_bad_line)
        splits[split] = pairs
        skipped = f"; skipped {report.skipped}: {'; '.join(report.skip_reasons[:3])}" if report.skipped else ""
        print(f"{split}: {len(pairs)} pairs from {path} ({dict(report.formats)}){skipped}", file=sys.stderr)
    out = tfds_data.write(args.name, args.data_dir, splits)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return configuration.EXIT_BAD_INPUT
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
