"""tiny: a toy model for tests; trains in seconds on one CPU core. Not expected to pass the gate.

  python -m jaxreward.main --config configs/tiny.py --workdir runs/tiny

Memory: ~100k parameters; negligible.
"""

from jaxreward import configuration


def get_config():
  config = configuration.defaults()
  config.data.synthetic_pairs = 400
  config.data.min_pairs = 0  # Tests use small data on purpose.
  config.data.vocab_size = 512
  config.data.max_length = 64
  config.data.num_buckets = 2
  config.model.hidden_size = 32
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.mlp_dim = 64
  config.train.batch_size = 16
  config.train.num_steps = 20
  config.train.warmup_steps = 5
  config.train.eval_every = 10
  config.train.log_every = 5
  config.train.train_eval_pairs = 64
  config.train.eval_batch_size = 32
  config.train.progress_bar = False
  return config
