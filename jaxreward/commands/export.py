"""python -m jaxreward.commands.export SOURCE OUT [--checkpoint best|latest|STEP] [--model_type llama|qwen2|mistral]

Exports a jaxreward work dir as a transformers reward model (`*ForSequenceClassification`): config.json,
model.safetensors (`model.*` + `score.weight` [1, hidden]), a tokenizer that encodes as training did (BOS if
any + text + EOS, cut from the left to data.max_length; checked on write), the export's own README.md model
card and reward_normalization.json (validation reward mean/std). Then plain `AutoTokenizer` +
`AutoModelForSequenceClassification` code scores as jaxreward does. SOURCE may also be a checkpoint folder
inside a work dir (`<workdir>/checkpoints/<step>`), which selects that step. OUT must be new or empty, or
`--overwrite` replaces it whole (written beside it first, then renamed into place); it is never a work dir.
Exit codes: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

from jaxreward import allocator

if __name__ == "__main__":
  allocator.reexec()  # Before JAX and the rest are imported: the second start then costs only Python's.

import os
import sys

from absl import flags

from jaxreward import artifacts, checkpoint, commands, configuration, hf, outputs, storage
from jaxreward.configuration import ConfigError

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", "best", "best | latest | STEP", flag_values=FLAGS)
flags.DEFINE_boolean("overwrite", False, "replace a non-empty output folder", flag_values=FLAGS)
flags.DEFINE_enum("model_type", None, ["llama", "qwen2", "mistral"],
                  "HF family to write; default: the init_from model's, else llama (qwen2 with q/k/v bias)",
                  flag_values=FLAGS)


def resolve(path: str, which: str | int) -> tuple[str, str | int]:
  """(work dir, checkpoint) from a work dir or a `<workdir>/<checkpoints dir>/<step>` folder."""
  path = os.fspath(storage.path(path))
  if not storage.isdir(path):
    raise ConfigError(f"{path}: no such folder")
  if storage.isfile(storage.join(path, "config.json")) and storage.isdir(storage.join(path, "tokenizer")):
    return path, which
  step = storage.path(path).name
  workdir = os.fspath(storage.path(path).parent.parent)
  if step.isdigit() and storage.isfile(storage.join(workdir, "config.json")):
    return workdir, int(step)
  raise ConfigError(f"{path}: not a jaxreward work dir (no config.json + tokenizer/) or one of its checkpoints")


def main(argv: list[str] | None = None) -> int:
  rest = commands.parse(FLAGS, argv, __doc__, ("SOURCE", "OUT"))
  if isinstance(rest, int):
    return rest
  try:
    source, out = rest
    workdir, which = resolve(source, checkpoint.parse_which(FLAGS.checkpoint))
    outputs.check_folder(out, FLAGS.overwrite, sources=(workdir,))
    loaded = artifacts.load(workdir, which)
    with outputs.replaced_folder(out) as partial:
      hf.export(loaded, loaded.tokenizer, partial, model_type=FLAGS.model_type)
  except ConfigError as e:
    return commands.fail(e)
  except OSError as e:
    return commands.fail(f"{out}: {e.strerror or e}")
  print(f"wrote {out} (step {loaded.step} of {workdir})")
  return configuration.EXIT_OK


def run() -> None:
  allocator.reexec()  # The installed script (pyproject [project.scripts]) enters here; a no-op under -m.
  sys.exit(main())


if __name__ == "__main__":
  run()
