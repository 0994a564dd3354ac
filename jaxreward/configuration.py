"""Every run setting with its default and meaning, and the checks that run before any compute.

`configs/*.py` start from `defaults()` and change what their size needs, so this is the one place that
documents each field. `validate` turns a bad value into a one-line `ConfigError`.
"""

from __future__ import annotations

import difflib
import math
import os

import ml_collections

# Exit codes of `python -m jaxreward.main`.
EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_PREEMPTED = 0, 1, 2, 3, 4


class ConfigError(ValueError):
  """A bad setting or input file, reported as one line before any compute."""


REMAT_POLICIES = ("none", "save_matmuls", "full")  # model.remat; model.py implements them.
# model.remat was a boolean before it named a policy: work dirs' config.json and old flags still say so.
_OLD_REMAT = {"True": "full", "False": "none", "true": "full", "false": "none"}


def remat_policy(value) -> str:
  """The policy that a model.remat value names, old booleans (True, "False", ...) included."""
  return _OLD_REMAT.get(str(value), value)


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.data = d = ml_collections.ConfigDict()
  d.source = "jsonl"  # jsonl: train_path/validation_path files; tfds: a TFDS dataset read via array_record.
  d.tfds_name = ""  # TFDS dataset name (source=tfds), e.g. "my_prefs" or "my_prefs:1.0.0".
  d.tfds_data_dir = ""  # Folder holding the TFDS dataset (source=tfds).
  d.train_path = ""  # Preference JSONL (or .json / .jsonl.gz); "" trains on the embedded synthetic task.
  d.validation_path = ""  # Optional explicit validation file; "" splits train_path 80/20 grouped by prompt.
  d.validation_fraction = 0.2  # Share of prompts held out when no validation_path is given.
  d.format = "auto"  # auto | explicit | implicit (HH-RLHF transcripts) | conversational (role/content lists) | ranked.
  d.on_bad_line = "error"  # error: stop at the first bad line with file:line; skip: count and report it.
  d.synthetic_pairs = 2400  # Size of the embedded synthetic task (train + validation).
  # Responses per synthetic prompt: 2 gives pairs; more gives ranked groups (synthetic.generate_ranked), best
  # trained with group_by_prompt.
  d.synthetic_responses = 2
  d.tokenizer = ""  # HF tokenizer folder; "" trains a byte-level BPE on the training texts.
  d.vocab_size = 2048  # Vocabulary of the trained BPE tokenizer (ignored with a tokenizer folder).
  d.max_length = 128  # Tokens per sequence (prompt + response + EOS).
  d.truncation = "keep_end"  # keep_end: cut the prompt's start first, never a response's end; drop: skip pair.
  d.packing = True  # Train on sequences packed into rows (segment-masked): far less padding than buckets.
  # Packed row width in tokens; 0 = max_length. When sequences often come close to max_length, rows of 2-4x
  # max_length waste less at their ends (ETHICS, small's BPE tokenizer, max_length 32, batch 8, 2 buckets:
  # 22.6% padding with rows of 32 -> 15.8% with rows of 64).
  d.pack_length = 0
  # Lay each batch out as prompt trees (graphs.py): a prompt once, each of its distinct responses once, every
  # pair an edge between two of them; the plan keeps a prompt's pairs together. Same loss and metrics; far
  # fewer tokens where prompts have several pairs or pairs share responses (ranked files, PandaLM).
  d.group_by_prompt = False
  d.num_buckets = 8  # Padded shapes: lengths max_length·k/num_buckets (rounded to 8), or packed row counts.
  d.sort_window = 32  # Without packing: batches per window sorted by length before batching (1 = no sorting).
  d.min_pairs = 1000  # Warn below this many usable pairs (also 80% / 20% of it for train / validation).

  c.model = m = ml_collections.ConfigDict()
  m.init_from = ""  # HF folder of an SFT model to start from; "" builds the model below from scratch.
  m.vocab_size = 0  # V: 0 = the tokenizer's size (from scratch) or the HF config's (init_from); set by the run.
  m.hidden_size = 128  # D: residual width.
  m.num_layers = 4  # Decoder blocks.
  m.num_heads = 4  # N: query heads.
  m.num_kv_heads = 2  # K: key/value heads (grouped-query attention when K < N).
  m.head_dim = 0  # H: per-head width; 0 means hidden_size // num_heads.
  m.mlp_dim = 384  # F: SwiGLU hidden width.
  m.rope_theta = 10000.0  # RoPE base.
  m.rope_scaling = ml_collections.FieldReference(None, field_type=dict)  # HF rope_scaling dict, or None.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.qkv_bias = False  # Bias on q/k/v projections (Qwen2).
  m.tie_embeddings = True  # Share input embedding and LM head (the LM head is unused for scoring).
  m.dtype = "float32"  # Compute dtype: float32 or bfloat16 (parameters and Adam state stay param_dtype).
  m.param_dtype = "float32"  # Storage dtype of parameters and optimizer state.
  # What each block's backward pass recomputes rather than keeps (activation memory vs compute): none keeps
  # everything; save_matmuls keeps the q/k/v/o projections and recomputes norms, RoPE, attention and the MLP;
  # full keeps only each block's input (~30% more compute). True / False (the old switch) mean full / none.
  m.remat = "none"
  # Stack the blocks' parameters on a leading "layers" axis and run them in one scan: compile time stops growing
  # with depth (worth it from ~8 layers). Work dirs keep the layout they were trained with.
  m.scan_layers = False
  # auto: cudnn on NVIDIA GPUs (bf16; xla for fp32 or group_by_prompt), splash on TPU, blockwise on CPU. xla: the dense
  # reference (fp32 [rows, heads, L, L] logits); cudnn: fused, NVIDIA, bf16; splash: Pallas TPU kernel;
  # blockwise: flash attention in plain JAX (any backend; the CPU choice). See jaxreward/attention.py.
  m.attention = "auto"

  c.train = t = ml_collections.ConfigDict()
  t.seed = 0  # Seeds the split, shuffling and initialisation.
  t.batch_size = 32  # Pairs per step across all devices and hosts.
  t.num_epochs = 3.0  # Passes over the training pairs; used when num_steps is 0.
  t.num_steps = 0  # Exact number of steps; overrides num_epochs when > 0.
  t.learning_rate = 1e-3  # Peak AdamW learning rate.
  t.warmup_steps = 50  # Linear warmup from 0.
  t.schedule = "cosine"  # cosine | linear | constant decay after warmup.
  t.end_learning_rate_factor = 0.1  # Final learning rate as a fraction of the peak.
  t.weight_decay = 0.01  # Decoupled weight decay on matrices (not norms or biases).
  t.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
  t.adam_b1 = 0.9  # Adam first-moment decay.
  t.adam_b2 = 0.95  # Adam second-moment decay.
  t.adam_eps = 1e-8  # Adam epsilon.
  # bradley_terry: -log σ(r_w - r_l - margin) per pair. plackett_luce: per winning response, -log of it being
  # chosen over everything it beats (loss.plackett_luce_losses): a ranked line's PL likelihood where its
  # responses share a prompt tree (data.group_by_prompt), Bradley-Terry otherwise; evaluation stays pairwise BT.
  t.loss = "bradley_terry"
  t.center_rewards_coef = 0.0  # coef·(r_c + r_r)² keeps rewards centred for RL (TRL: 0.01); 0 disables.
  t.eval_every = 100  # Steps between validation (and checkpoint) points; the last step always evaluates.
  t.log_every = 10  # Steps between rows of metrics.jsonl.
  t.train_eval_pairs = 512  # Fixed sample of training pairs scored like validation to measure the gap.
  t.eval_batch_size = 64  # Pairs per evaluation batch.
  t.keep_best = 1  # Best-by-validation-accuracy checkpoints kept (the latest one is always kept too).
  t.grad_accum_steps = 1  # Microbatches per step (same update as the full batch, 1/A of the activation memory).
  t.nan_policy = "stop"  # stop: a non-finite loss/gradient ends the run (exit 1); skip: drop that update, count it.
  t.max_steps_per_run = 0  # Stop (with a checkpoint) after this many steps of one invocation; 0 = run to the end.
  t.compilation_cache = ""  # Folder for XLA's persistent compilation cache; "" disables.
  t.progress_bar = True  # tqdm bar with running loss and accuracy.
  # auto: a re-run of a work dir resumes only when it is the same run (rundir.py: model, tokenizer, data files,
  # split, data order, optimizer) and refuses otherwise; force: resume anyway, the differences go into the card.
  t.resume = "auto"

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # Data-parallel replicas; -1 takes the devices the other axes leave.
  ms.fsdp = 1  # Parameter/optimizer-state sharding (ZeRO-3 style); batch is split over it too.
  ms.tensor = 1  # Tensor (Megatron) parallelism over heads and MLP width.
  # Logical axis -> mesh axes. Every parameter names its logical axes in model.py.
  ms.rules = [
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("norm", None),
      ("score", None),
      ("layers", None),  # The stacked blocks' leading axis (model.scan_layers): each device holds every layer.
  ]

  c.distributed = ds = ml_collections.ConfigDict()
  # Multi-host runs: every host runs the same command; jax.distributed.initialize joins them.
  # auto: when coordinator_address is set or a GKE TPU slice / SLURM / Open MPI launched several processes;
  # yes (launch/tpu_vm.sh passes it: Cloud TPU VMs are found from their metadata); no.
  ds.initialize = "auto"
  ds.coordinator_address = ""  # "host:port" of process 0; "" lets JAX detect it (TPU VMs, SLURM).
  ds.num_processes = 0  # Total processes; 0 = detect.
  ds.process_id = -1  # This process's index; -1 = detect.
  # A process silent this long (killed, host down) stops every other process with an error, instead of a hang.
  ds.heartbeat_timeout_s = 100
  ds.initialization_timeout_s = 300  # How long each process waits for all others to join at start-up.

  c.gate = g = ml_collections.ConfigDict()
  g.min_train_accuracy = 0.70  # Best checkpoint's accuracy on the fixed training sample.
  g.min_val_accuracy = 0.70  # Best checkpoint's validation accuracy.
  g.max_gap = 0.10  # train_accuracy − val_accuracy must stay below this.
  # Converged: the last eval interval's mean training loss moved (vs. the one before) by < abs_tol, or by < rel_tol
  # of the previous interval's loss or of the total drop since the first interval.
  g.converged_rel_tol = 0.10
  g.converged_abs_tol = 0.02
  return c


_CHOICES = {
    ("data", "source"): ("jsonl", "tfds"),
    ("data", "format"): ("auto", "explicit", "implicit", "conversational", "ranked"),
    ("data", "on_bad_line"): ("error", "skip"),
    ("data", "truncation"): ("keep_end", "drop"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "attention"): ("auto", "xla", "cudnn", "splash", "blockwise"),
    ("model", "remat"): REMAT_POLICIES,
    ("train", "schedule"): ("cosine", "linear", "constant"),
    ("train", "loss"): ("bradley_terry", "plackett_luce"),
    ("train", "nan_policy"): ("stop", "skip"),
    ("train", "resume"): ("auto", "force"),
    ("distributed", "initialize"): ("auto", "yes", "no"),
}
_POSITIVE = [("data", "max_length"), ("data", "num_buckets"), ("data", "sort_window"), ("data", "vocab_size"),
             ("model", "hidden_size"), ("model", "num_layers"), ("model", "num_heads"), ("model", "num_kv_heads"),
             ("model", "mlp_dim"), ("train", "batch_size"), ("train", "eval_every"), ("train", "log_every"),
             ("train", "eval_batch_size"), ("train", "keep_best"), ("train", "grad_accum_steps"), ("train", "learning_rate"),
             ("distributed", "heartbeat_timeout_s"), ("distributed", "initialization_timeout_s")]
_SECTIONS = ("data", "model", "train", "mesh", "distributed", "gate")


def known_keys() -> list[str]:
  reference = defaults()
  return [f"{section}.{key}" for section in _SECTIONS for key in reference[section].keys()]


def unknown_key(path: str) -> str:
  """The one-line complaint about a setting that does not exist, with the closest real ones."""
  close = difflib.get_close_matches(path, known_keys(), n=3, cutoff=0.6)
  if not close:  # "train.save_every" is far from "train.eval_every" as a whole but close in its last part.
    leaf = path.rsplit(".", 1)[-1]
    close = [k for k in known_keys() if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
        leaf, [k.rsplit(".", 1)[-1] for k in known_keys()], n=3, cutoff=0.6)][:3]
  return f"config: unknown key {path}" + (f"; did you mean {' or '.join(close)}?" if close else
                                          "; jaxreward/configuration.py lists every setting")


def check_overrides(argv) -> None:
  """Names an unknown `--config.SECTION.KEY=` override before absl does (it says only the last part)."""
  known = set(known_keys())
  for arg in argv[1:]:
    if arg.startswith("--config.") and "=" in arg:
      path = arg[len("--config."):].split("=", 1)[0]
      if path not in known and path not in _SECTIONS:
        raise ConfigError(unknown_key(path))


def _check_type(path: str, value, default) -> None:
  """A value of another type than its default's fails here rather than deep inside the run."""
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and not math.isfinite(value):
      raise ConfigError(f"config: {path}={value!r}; expected a finite number")
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, (list, tuple)):
    ok = isinstance(value, (list, tuple))
  else:
    return
  if not ok:
    expected = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), "a list")
    raise ConfigError(f"config: {path}={value!r} ({type(value).__name__}); expected {expected}")


def validate(config) -> None:
  """Raises ConfigError naming the key and what was expected; never touches a device."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config: get_config() returned a {type(config).__name__}; expected an "
                      "ml_collections.ConfigDict (start from configuration.defaults())")
  for section in config.keys():
    if section not in _SECTIONS:
      raise ConfigError(f"config: unknown section {section!r}; expected one of {', '.join(_SECTIONS)}")
  reference = defaults()
  for section in _SECTIONS:
    if section not in config:
      raise ConfigError(f"config: missing section {section!r}")
    if not isinstance(config[section], ml_collections.ConfigDict):
      raise ConfigError(f"config: {section} is a {type(config[section]).__name__}; expected a section of settings")
    for key in config[section].keys():
      if key not in reference[section]:
        raise ConfigError(unknown_key(f"{section}.{key}"))
    for key in reference[section].keys():
      if key not in config[section]:
        raise ConfigError(f"config: missing key {section}.{key} (start from configuration.defaults())")
      _check_type(f"{section}.{key}", config[section][key], reference[section][key])
  if config.model.rope_scaling is not None and not isinstance(config.model.rope_scaling, dict):
    raise ConfigError(f"config: model.rope_scaling={config.model.rope_scaling!r}; expected None or a dict")
  for (section, key), allowed in _CHOICES.items():
    value = config[section][key]
    if (remat_policy(value) if (section, key) == ("model", "remat") else value) not in allowed:
      raise ConfigError(f"config: {section}.{key}={config[section][key]!r}; expected one of {', '.join(allowed)}")
  for section, key in _POSITIVE:
    if not config[section][key] > 0:
      raise ConfigError(f"config: {section}.{key}={config[section][key]!r}; expected a positive number")
  d, m, t = config.data, config.model, config.train
  if not 0.0 < d.validation_fraction < 1.0:
    raise ConfigError(f"config: data.validation_fraction={d.validation_fraction}; expected 0 < x < 1")
  if t.num_steps < 0 or (t.num_steps == 0 and not t.num_epochs > 0):
    raise ConfigError("config: train.num_steps must be > 0, or train.num_epochs > 0 with num_steps = 0")
  if d.max_length % 8 or d.max_length < 8 * d.num_buckets:
    raise ConfigError(f"config: data.max_length={d.max_length}; expected a multiple of 8 and >= 8·num_buckets")
  if d.synthetic_responses < 2:
    raise ConfigError(f"config: data.synthetic_responses={d.synthetic_responses}; expected 2 or more")
  if d.pack_length and (d.pack_length % 8 or d.pack_length < d.max_length):
    raise ConfigError(f"config: data.pack_length={d.pack_length}; expected 0 or a multiple of 8 >= data.max_length "
                      f"({d.max_length})")
  if not m.init_from:
    if m.num_heads % m.num_kv_heads:
      raise ConfigError(f"config: model.num_heads={m.num_heads} must be a multiple of num_kv_heads={m.num_kv_heads}")
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    if head_dim % 2 or (not m.head_dim and m.hidden_size % m.num_heads):
      raise ConfigError(f"config: model.hidden_size={m.hidden_size} / num_heads={m.num_heads} must give an even "
                        "head_dim (or set model.head_dim)")
  if m.attention == "cudnn" and m.dtype != "bfloat16":
    raise ConfigError("config: model.attention='cudnn' needs model.dtype='bfloat16'")
  if m.attention == "cudnn" and d.group_by_prompt:
    # Packed rows are checked against the reference on an H100; shared-prompt masks are not yet.
    raise ConfigError("config: data.group_by_prompt needs model.attention='auto' or 'xla' (cudnn with "
                      "shared-prompt rows is not yet checked on a GPU)")
  for key in ("min_train_accuracy", "min_val_accuracy", "max_gap"):
    if not 0.0 <= config.gate[key] <= 1.0:
      raise ConfigError(f"config: gate.{key}={config.gate[key]}; expected a fraction in [0, 1]")
  for axis in ("data", "fsdp", "tensor"):
    if config.mesh[axis] == 0 or config.mesh[axis] < -1:
      raise ConfigError(f"config: mesh.{axis}={config.mesh[axis]}; expected a positive size or -1")
  for i, rule in enumerate(config.mesh.rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config: mesh.rules[{i}]={rule!r}; expected (logical_name, mesh_axes)")
  for path_key in ("train_path", "validation_path", "tokenizer"):
    path = d[path_key]
    if path and not os.path.exists(path):
      raise ConfigError(f"config: data.{path_key}={path!r} does not exist")
  if d.validation_path and not d.train_path:
    raise ConfigError("config: data.validation_path needs data.train_path")
  if m.init_from and not os.path.isdir(m.init_from):
    raise ConfigError(f"config: model.init_from={m.init_from!r} is not a folder")
