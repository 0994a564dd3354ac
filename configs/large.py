"""large: an ~8B-parameter reward model (Llama-3-8B dimensions) on a TPU pod slice, FSDP + tensor parallel.

  launch/tpu_vm.sh --name rm-8b --zone us-east5-a --accelerator-type v5p-64 --config configs/large.py \
      --workdir /mnt/shared/runs/large -- --config.model.init_from=/mnt/shared/Meta-Llama-3-8B-Instruct
  python tools/memory.py --config configs/large.py [--devices 64]   # the estimate below, for any slice

Start from an SFT model: `model.init_from` (an HF folder on storage every worker sees) brings tokenizer,
architecture and weights; from scratch the run needs `data.tokenizer`. The work dir must be shared by all
workers (orbax writes each checkpoint collectively). Expected (not measured in this project, which has no
TPU; typical of 8B reward models): ~100k preference pairs, 1 epoch (~1,560 steps of 64 pairs) from an 8B SFT
start reach validation accuracy ~0.70-0.75 on HH-RLHF-like data, in a few hours on a v5p-64 (32 chips).

Mesh: data=-1 x fsdp=8 x tensor=4 (preset fsdp_tp): 32 chips make one FSDP x TP group; bigger slices add
data-parallel replicas of it. Tensor parallel over 4 devices splits heads (32), KV heads (8), MLP width and
vocabulary, so the attention scores and MLP intermediates of a 2,048-token sequence are split too.
Memory per device on 32 chips (tools/memory.py; 8.03B parameters, untied LM head as Llama-3-8B, fp32
parameters and Adam state, bf16 compute, remat on, 64 pairs = 128 sequences x 2,048 tokens, xla attention):
  parameters 0.94 GiB + gradients 0.94 GiB + Adam 1.87 GiB = 3.7 GiB of state (exact: 128 GiB / 32 devices,
  less the replicated norms), activations ~20.9 GiB (32 saved block inputs of 16 x 2,048 x 4,096 bf16 = 8 GiB,
  plus one block recomputed with its 8-head x 2,048 x 2,048 fp32 scores), FSDP-gathered weights 0.2 GiB,
  total ~24.9 GiB: fits v5p-64 (95 GiB chips) and v4-64 (32 GiB chips), not v5e (16 GiB).
  v5litepod-64 (--devices 64: data=2 halves the per-device batch): 14.4 GiB, at the edge of 16 GiB chips;
  add --config.train.grad_accum_steps=2 for 10.1 GiB. The whole state is 128 GiB, so no batch size trains 8B on
  fewer than ~4 v5p or 8 v4 chips.
"""

from jaxreward import configuration, presets


def get_config():
  config = configuration.defaults()
  config.data.vocab_size = 128256  # Llama 3's vocabulary: what init_from/tokenizer normally give.
  config.data.max_length = 2048
  config.data.num_buckets = 8
  config.data.min_pairs = 5000
  config.model.hidden_size = 4096
  config.model.num_layers = 32
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.head_dim = 128
  config.model.mlp_dim = 14336
  config.model.rope_theta = 500000.0
  config.model.norm_eps = 1e-5
  config.model.tie_embeddings = False  # As Llama-3-8B: the LM head is kept (unused) so exports round-trip.
  config.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; fp32 parameters and Adam state.
  config.model.param_dtype = "float32"
  config.model.remat = "full"
  config.model.scan_layers = True  # 32 blocks compiled once.
  config.model.attention = "xla"  # TPUs have no cuDNN; the L x L scores live for one block at a time.
  config.train.batch_size = 64  # A multiple of data x fsdp on every slice from 32 to 512 chips.
  config.train.num_epochs = 1.0
  config.train.learning_rate = 5e-6
  config.train.warmup_steps = 50
  config.train.weight_decay = 0.0
  config.train.eval_every = 200
  config.train.eval_batch_size = 64
  config.train.center_rewards_coef = 0.01
  config.train.compilation_cache = "/tmp/jaxreward_xla_cache"  # An 8B step compiles in minutes; reruns skip it.
  presets.apply(config, "fsdp_tp", data=-1, fsdp=8, tensor=4)
  return config
