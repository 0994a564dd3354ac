"""medium: a ~1.2B-parameter reward model (Llama-3.2-1B dimensions) fine-tuned on one 80 GB GPU.

  python -m jaxreward.main --config configs/medium.py --workdir runs/medium \
      --config.model.init_from=/path/to/Llama-3.2-1B-Instruct --config.data.train_path=pairs.jsonl
  python tools/memory.py --config configs/medium.py        # the per-device estimate below, for any override

Start from an SFT model: `model.init_from` (an HF folder with config.json + safetensors) brings the tokenizer,
the architecture (it replaces the dimensions below) and the weights. Without it the model is built from
scratch with these dimensions and needs `data.tokenizer` (an HF tokenizer folder); only with neither does the
run train its own BPE of `data.vocab_size` tokens on the training texts, which suits no model of this size.
Expected (typical of 1B reward models; this config has not been run end to end): on HH-RLHF helpful (~43k
pairs, 1 epoch, ~1,350 steps of 32 pairs) a 1B SFT start reaches validation accuracy ~0.65-0.70. Time, scaled
from the H100 benchmark of these widths (tools/gpu_check.sh, README "Performance": 4 layers, packed, remat full,
57 ms per 16k tokens): ~0.23 s per 16k tokens for 16 layers, so roughly 10-20 minutes per epoch on one H100.

Memory per device (tools/memory.py; 1.24B parameters, fp32 parameters and Adam state, bf16 compute, remat on,
batch 32 pairs = 64 sequences x 1,024 tokens, cudnn flash attention):
  parameters 4.6 GiB + gradients 4.6 GiB + Adam 9.2 GiB = 18.4 GiB of state (exact, from the sharded shapes),
  activations ~17.5 GiB (16 saved block inputs of 64 x 1,024 x 2,048 bf16 = 4 GiB, plus one block recomputed
  with its gradients), total ~35.9 GiB: fits one H100 / A100 80 GB or H200 (and a TPU v5p chip).
  A100 40 GB: --config.train.grad_accum_steps=2 (31.8 GiB). With --config.model.attention=xla (no cuDNN) the
  L x L scores of one block add ~24 GiB: 59.9 GiB, still one H100. On 8 devices FSDP takes them all (fsdp=8):
  7.7 GiB per device even with xla attention, so a TPU v5litepod-8 (16 GiB chips) or 8 x L4 also fit.
"""

from jaxreward import configuration, presets


def get_config():
  config = configuration.defaults()
  config.data.vocab_size = 128256  # Llama 3's vocabulary: what init_from/tokenizer normally give.
  config.data.max_length = 1024
  config.data.num_buckets = 8
  config.data.min_pairs = 5000
  config.model.hidden_size = 2048
  config.model.num_layers = 16
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.head_dim = 64
  config.model.mlp_dim = 8192
  config.model.rope_theta = 500000.0
  config.model.norm_eps = 1e-5
  config.model.tie_embeddings = True  # As Llama-3.2-1B.
  config.model.dtype = "bfloat16"  # Matmuls in bf16; parameters and Adam state stay float32 for stable updates.
  config.model.param_dtype = "float32"
  config.model.remat = "full"  # Recompute each block in the backward pass: ~16x fewer saved activations.
  config.model.scan_layers = True  # 16 blocks compiled once.
  # cuDNN flash attention on NVIDIA GPUs (bf16), packed rows included; splash on TPU; blockwise on CPU.
  config.model.attention = "auto"
  config.data.packing = True  # Rows packed with several pairs: little padding (cuDNN takes the segment mask).
  config.train.batch_size = 32
  config.train.num_epochs = 1.0  # Reward models overfit after one epoch (InstructGPT, TRL defaults).
  config.train.learning_rate = 1e-5
  config.train.warmup_steps = 50
  config.train.weight_decay = 0.0
  config.train.eval_every = 200
  config.train.log_every = 10
  config.train.eval_batch_size = 64
  config.train.center_rewards_coef = 0.01
  # One GPU: fsdp=-1 resolves to 1 (plain single-device); on 8 GPUs it shards state over all of them.
  presets.apply(config, "fsdp")
  return config
