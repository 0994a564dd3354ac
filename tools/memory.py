"""Prints a config's per-device memory estimate and the accelerators it fits, without touching a device.

  python tools/memory.py --config configs/large.py [--config.mesh.fsdp=16] [--devices 64]

A -1 mesh axis takes the devices the others leave; with no --devices it is resolved to the fewest devices the
fixed axes need (the worst case per device for a fixed global batch). The vocabulary comes from
model.init_from's config.json, else data.tokenizer, else data.vocab_size.
"""

import math
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxreward import configuration, hf, memory, model as model_lib, sharding, tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/medium.py", "Run configuration file.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Total devices to resolve a -1 mesh axis; 0 = the fewest possible.")


def model_config(config):
  if config.model.init_from:
    return hf.model_config(config.model.init_from, config.model.copy_and_resolve_references())
  vocab = config.data.vocab_size
  if config.data.tokenizer:
    vocab = tokenizer_lib.vocab_size(tokenizer_lib.load(config.data.tokenizer))
  return model_lib.ModelConfig.from_config(config.model, vocab)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  config = _CONFIG.value
  try:
    fixed = math.prod(int(config.mesh[a]) for a in sharding.MESH_AXES if int(config.mesh[a]) != -1)
    shape = sharding.mesh_shape(config.mesh, _DEVICES.value or fixed)
    est = memory.from_config(config, model_config(config), dict(zip(sharding.MESH_AXES, shape)))
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(configuration.EXIT_BAD_INPUT)
  print(memory.render(est))


if __name__ == "__main__":
  app.run(main)
