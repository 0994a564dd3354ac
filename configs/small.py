"""small: a ~1M-parameter reward model that trains on 2 CPU cores in a few minutes.

  python -m jaxreward.main --config configs/small.py --workdir runs/small

Expected on the embedded synthetic task (2,400 pairs; compare / maximum / category): validation accuracy
0.96-0.99 and gate PASS in about 2 minutes on 2 CPU cores (measured with packed batches, seeds 0 / 1 / 2:
0.976 / 0.985 / 0.969 at the best checkpoint, 94-107 s; the seed also picks the split). On your data:
  --config.data.train_path=pairs.jsonl [--config.data.validation_path=val.jsonl]
ETHICS (ethics_util_train.jsonl, --config.train.num_epochs=2): validation 0.749 on its 20% split, 0.673 on
ethics_util_test.jsonl (95% CI 0.659-0.686), gate PASS, 4.5 minutes; 4.1% of token slots are padding.
max_length=64 suits short texts like ETHICS; chat and long-answer files
(Auto-J, PandaLM, the LLaMA-Factory and OASST files) have most pairs cut at 64: raise
--config.data.max_length (e.g. 256, at ~4x the cost per step).
Memory: ~1.2M parameters x (4 B + 8 B Adam) ≈ 15 MiB, plus activations of 32 pairs x 2 x 128 tokens
(≈ 50 MiB): well under 1 GiB of host memory.
"""

from jaxreward import configuration


def get_config():
  config = configuration.defaults()
  config.model.hidden_size = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 384
  config.data.max_length = 64  # The synthetic task's sequences are < 40 tokens.
  config.train.batch_size = 32
  config.train.num_epochs = 8.0
  config.train.learning_rate = 1e-3
  config.train.eval_every = 100
  return config
