"""Exports a jaxreward work dir as a transformers reward model (`*ForSequenceClassification`).

  python tools/convert_to_hf.py runs/smollm2 runs/smollm2_rm [--checkpoint best|latest|STEP]

Writes config.json, model.safetensors (`model.*` + `score.weight` [1, hidden]), a tokenizer that encodes
as training did (BOS if any + text + EOS, cut from the left to data.max_length; checked on write), the
export's own README.md model card and reward_normalization.json (validation reward mean/std) to <out>.
Then plain `AutoTokenizer` + `AutoModelForSequenceClassification` code scores as jaxreward does. The first
argument may also be a checkpoint folder inside a work dir (`<workdir>/checkpoints/<step>`), which
selects that step. <out> must be new or empty, or `--overwrite` replaces it whole (written beside it first,
then renamed into place); it is never a work dir. Exit codes: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxreward import outputs  # pylint: disable=g-import-not-at-top
from jaxreward.configuration import ConfigError, EXIT_BAD_INPUT  # pylint: disable=g-import-not-at-top


def resolve(path: str, which: str) -> tuple[str, str]:
  """(work dir, checkpoint) from a work dir or a `<workdir>/<checkpoints dir>/<step>` folder."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ConfigError(f"{path}: no such folder")
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "tokenizer")):
    return path, which
  step = os.path.basename(path)
  workdir = os.path.dirname(os.path.dirname(path))
  if step.isdigit() and os.path.isfile(os.path.join(workdir, "config.json")):
    return workdir, step
  raise ConfigError(f"{path}: not a jaxreward work dir (no config.json + tokenizer/) or one of its checkpoints")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("source", help="a jaxreward work dir, or a checkpoint folder inside one")
  parser.add_argument("out", help="output folder")
  parser.add_argument("--checkpoint", default="best", help="best | latest | STEP (default: best)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
  parser.add_argument("--model_type", default=None, choices=("llama", "qwen2", "mistral"),
                      help="HF family to write; default: the init_from model's, else llama (qwen2 with q/k/v bias)")
  args = parser.parse_args(argv)
  try:
    if args.checkpoint not in ("best", "latest") and not args.checkpoint.isdigit():
      raise ConfigError(f"--checkpoint={args.checkpoint!r}; expected best, latest or a step number")
    workdir, which = resolve(args.source, args.checkpoint)
    outputs.check_folder(args.out, args.overwrite, sources=(workdir,))
    from jaxreward import artifacts, hf  # pylint: disable=g-import-not-at-top  (keeps --help fast)
    loaded = artifacts.load(workdir, which)
    with outputs.replaced_folder(args.out) as partial:
      hf.export(loaded, loaded.tokenizer, partial, model_type=args.model_type)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except OSError as e:
    print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"wrote {args.out} (step {loaded.step} of {workdir})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
