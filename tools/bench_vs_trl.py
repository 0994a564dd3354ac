"""jaxreward vs TRL's RewardTrainer: time to train the same reward model on the same pairs, same machine.

  pip install -e '.[bench]'
  python tools/bench_vs_trl.py [--config configs/small.py] [--pairs 3200] [--repeats 2] [--json out.json]
  python tools/bench_vs_trl.py --data ../shared/data/autoj_hh_style.jsonl --pairs 768 --max_length 256
  python tools/bench_vs_trl.py --data ../shared/data/pandalm.jsonl --max_length 512 --sides graph,jax,trl
  python tools/bench_vs_trl.py --data ../shared/data/autoj_hh_style.jsonl --pairs 48 --max_length 256 \
      --batch_size 8 --repeats 1 --config.model.hidden_size=576 --config.model.num_layers=30 \
      --config.model.num_heads=9 --config.model.num_kv_heads=3 --config.model.mlp_dim=1536 \
      --config.data.num_buckets=1      # SmolLM2-135M's dims; one packed row count: one ~1 min compile, not 6

Both sides train a Llama-architecture reward model of the config's dimensions (fp32, no dropout) with the same
byte-level BPE tokenizer (`tokenizer.train_bpe` on the training texts, built once here), the same token ids
(jaxreward's encoding, keep_end truncation to --max_length: TRL itself would drop over-long pairs instead), the
same batch size, AdamW (betas, eps, weight decay, clipping, warmup + cosine) and the same N pairs (one pass) of
the file's 80% training split by prompt (corpus.split); afterwards each side scores the 20% validation split:
  graph: the jax side with data.group_by_prompt (graphs.py): a prompt's pairs batched together, each prompt and
       each distinct response computed once.
  jax: the jitted train step of `train.py` over the real grain pipeline (the config's layout: packed rows by
       default, or with --config.data.packing=False length buckets and sorted-within-window batches; prefetching
       thread), metrics fetched a step late as in `train_and_evaluate`. Every batch shape the run will use is
       compiled first on a throwaway state ("compile"), so the timed pass recompiles nothing (counted). The
       child gets glibc's huge-page tunable as jaxreward's commands give themselves (jaxreward/allocator.py);
       TRL runs as it comes (set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 here to give it to both sides).
  trl: `trl.RewardTrainer` on `transformers.LlamaForSequenceClassification`; its collator pads each batch to its
       longest sequence; no evaluation, saving or reporting.
Each run is its own subprocess (clean peak RSS); sides alternate (jax, trl, jax, trl, ...) so load drift hits
both. "tokens/pair" counts the tokens each side's backbone computes per training pair (padding aside). "time" is
the wall time of the whole pass over N pairs, data loading included, setup (reading, tokenizing,
model construction, compilation) excluded; "step" is the median interval between finished steps. Tokens/s is
given over padded slots and over real tokens only. Check `uptime` first: on a loaded machine the figures are noise.
On a machine shared with other jobs, torch's OpenMP threads stall far more than XLA's pool (measured: 2.7-5.0 s
vs 1.1 s TRL steps at load ~5); `OMP_NUM_THREADS=1` (inherited by the children) gives TRL its fairer figure there.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from jaxreward import allocator

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Model / optimizer configuration.")
_DATA = flags.DEFINE_string("data", "../shared/data/ethics_util_train.jsonl", "Preference pairs (jsonl).")
_PAIRS = flags.DEFINE_integer("pairs", 3200, "Training pairs per run (rounded down to whole batches).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per side, alternating jax/trl.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Maximum tokens per sequence; 0 = the config's.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Pairs per batch; 0 = the config's.")
_SIDES = flags.DEFINE_list("sides", ["jax", "trl"], "Which sides to run (graph, jax, trl).")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", None, "XLA_FLAGS for the jax side (default: inherited).")
_JSON = flags.DEFINE_string("json", "", "Also write all runs and the summary to this JSON file.")
# Internal: a child process runs one side on the data prepared by the parent.
_CHILD = flags.DEFINE_string("child", "", "(internal) run one side: graph | jax | trl.")
_WORKDIR = flags.DEFINE_string("workdir", "", "(internal) the prepared data.")


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


# ---------------------------------------------------------------------------------------------------------------
# Parent: prepare once, then alternate children
# ---------------------------------------------------------------------------------------------------------------


def _prepare(config, workdir: str) -> dict:
  from jaxreward import corpus, data, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  pairs, _ = data.load_pairs(_DATA.value, "auto", "skip")
  pairs, _ = corpus.deduplicate(pairs)
  pairs, val_pairs = corpus.split(pairs, 0.2, config.train.seed)
  batch = config.train.batch_size
  n = min(_PAIRS.value, len(pairs)) // batch * batch
  if n == 0:
    raise app.UsageError(f"{_DATA.value}: {len(pairs)} pairs, fewer than one batch of {batch}")
  pairs = pairs[:n]
  tok = tokenizer_lib.train_bpe(tokenizer_lib.texts_for_tokenizer(pairs), config.data.vocab_size)
  tok.save_pretrained(os.path.join(workdir, "tokenizer"))
  enc = tokenizer_lib.encode(pairs, tok, config.data.max_length, "keep_end")
  val = tokenizer_lib.encode(val_pairs, tok, config.data.max_length, "keep_end")
  with open(os.path.join(workdir, "ids.json"), "w") as f:
    json.dump({"train": [[a.tolist(), b.tolist()] for a, b in enc.ids], "prompt_group": enc.prompt_group.tolist(),
               "validation": [[a.tolist(), b.tolist()] for a, b in val.ids]}, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json())
  lengths = enc.lengths()
  return {"pairs": n, "val_pairs": len(val), "prompts": int(enc.prompt_group.max()) + 1, "steps": n // batch, "vocab": len(tok), "truncated_pairs": enc.truncated,
          "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max())}


def _run_child(side: str, workdir: str) -> dict:
  env = dict(os.environ)
  if side in ("jax", "graph"):
    # The jax side runs as `python -m jaxreward.main` would (allocator.reexec); TRL as it comes. Both with the
    # tunable: run this script with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 set.
    env = allocator.environment(env) or env
    if _XLA_FLAGS.value is not None:
      env["XLA_FLAGS"] = _XLA_FLAGS.value
  out = os.path.join(workdir, f"result_{side}.json")
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={side}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"{side} run failed (exit {proc.returncode})")
  with open(out) as f:
    return json.load(f)


def _parent(config) -> None:
  if not os.path.exists(_DATA.value):
    print(f"skipped: {_DATA.value} not found (get the shared data sets, or pass --data)")
    return
  if _MAX_LENGTH.value:
    config.data.max_length = _MAX_LENGTH.value
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as workdir:
    info = _prepare(config, workdir)
    m = config.model
    print(f"data {_DATA.value}: {info['pairs']} pairs ({info['prompts']} prompts; {info['val_pairs']} validation "
          f"pairs) = {info['steps']} steps of {config.train.batch_size}; "
          f"max_length {config.data.max_length} ({info['truncated_pairs']} pairs truncated); mean "
          f"{info['mean_tokens']:.1f} tokens/sequence; vocab {info['vocab']}; model d={m.hidden_size} "
          f"L={m.num_layers} heads {m.num_heads}/{m.num_kv_heads} mlp {m.mlp_dim}; load {os.getloadavg()[0]:.2f}")
    runs = []
    for r in range(_REPEATS.value):
      for side in _SIDES.value:
        load = os.getloadavg()[0]
        res = _run_child(side, workdir) | {"side": side, "repeat": r, "load_before": load}
        runs.append(res)
        print(f"  {side} #{r}: {res['time_s']:.2f} s for {info['pairs']} pairs | step {res['step_ms']:.1f} ms | "
              f"{res['real_tokens'] / info['pairs']:.0f} tokens/pair | val acc {res['val_accuracy']:.3f} | "
              f"{res['tokens_per_s']:,.0f} tok/s padded, {res['real_tokens_per_s']:,.0f} real | padding "
              f"{res['padding']:.0%} | setup {res['setup_s']:.1f} s, compile {res['compile_s']:.2f} s | peak RSS "
              f"{res['peak_rss_mib']:.0f} MiB | load {load:.2f}", flush=True)
  summary = {}
  for side in _SIDES.value:
    mine = [r for r in runs if r["side"] == side]
    summary[side] = {k: statistics.median(r[k] for r in mine) for k in
                     ("time_s", "step_ms", "tokens_per_s", "real_tokens_per_s", "padding", "compile_s",
                      "peak_rss_mib", "val_accuracy")}
    summary[side]["tokens_per_pair"] = mine[0]["real_tokens"] / info["pairs"]
    summary[side]["recompiles_after_warmup"] = max(r.get("recompiles_after_warmup", 0) for r in mine)
    summary[side]["distinct_shapes"] = mine[0].get("distinct_shapes")
  print(f"{'median':8s}{'time s':>9s}{'step ms':>9s}{'tok/pair':>9s}{'tok/s pad':>11s}{'tok/s real':>11s}"
        f"{'padding':>9s}{'compile s':>10s}{'RSS MiB':>9s}{'val acc':>9s}")
  for side, s in summary.items():
    print(f"{side:8s}{s['time_s']:9.2f}{s['step_ms']:9.1f}{s['tokens_per_pair']:9.0f}{s['tokens_per_s']:11,.0f}"
          f"{s['real_tokens_per_s']:11,.0f}{s['padding']:9.0%}{s['compile_s']:10.2f}{s['peak_rss_mib']:9.0f}"
          f"{s['val_accuracy']:9.3f}")
  for side in summary:
    if side != "trl" and "trl" in summary:
      print(f"{side} / trl: time {summary[side]['time_s'] / summary['trl']['time_s']:.2f}x")
  if "jax" in summary and "trl" in summary:
    j, t = summary["jax"], summary["trl"]
    summary["ratio_time_jax_over_trl"] = j["time_s"] / t["time_s"]
    summary["ratio_step_jax_over_trl"] = j["step_ms"] / t["step_ms"]
    summary["ratio_rss_jax_over_trl"] = j["peak_rss_mib"] / t["peak_rss_mib"]
    print(f"jaxreward / TRL: time {summary['ratio_time_jax_over_trl']:.2f}x, step "
          f"{summary['ratio_step_jax_over_trl']:.2f}x, peak RSS {summary['ratio_rss_jax_over_trl']:.2f}x "
          f"(< 1: jaxreward is faster / smaller); jax shapes {j['distinct_shapes']}, recompiles after warm-up "
          f"{j['recompiles_after_warmup']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"data": _DATA.value, "info": info, "config": config.to_dict(), "runs": runs, "summary": summary,
                 "load_end": os.getloadavg()[0]}, f, indent=2, default=str)


# ---------------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------------


def _load_workdir(workdir: str):
  """(config, training ids, their prompt groups, validation ids)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, "ids.json")) as f:
    saved = json.load(f)
  ids, val = ([[np.asarray(a, np.int32), np.asarray(b, np.int32)] for a, b in saved[k]] for k in ("train", "validation"))
  return config, ids, np.asarray(saved["prompt_group"], np.int64), val


def _summarise(ends: list, start: float, padded: int, real: int, setup_s: float, compile_s: float, **extra) -> dict:
  total = ends[-1] - start
  return {"time_s": total, "real_tokens": real, "step_ms": 1e3 * float(np.median(np.diff([start] + ends))),
          "tokens_per_s": padded / total, "real_tokens_per_s": real / total, "padding": 1 - real / padded,
          "setup_s": setup_s, "compile_s": compile_s, "peak_rss_mib": _peak_rss_mib(), **extra}


def _jax_child(workdir: str, group_by_prompt: bool = False) -> dict:
  began = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  from jaxreward import model as model_lib, pipeline, sharding, state  # pylint: disable=g-import-not-at-top
  from jaxreward import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config, ids, prompt_group, val_ids = _load_workdir(workdir)
  config.data.group_by_prompt = group_by_prompt
  t = config.train
  tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  enc = tokenizer_lib.Encoded(ids=ids, margin=np.zeros(len(ids), np.float32), pairs=[None] * len(ids),
                              prompt_group=prompt_group)
  plan = pipeline.make_plan(config, enc)
  num_steps = plan.batches_per_epoch
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  layout, _ = pipeline.make_layout(config, plan, batch_shards, tok.pad_token_id)
  model_cfg = model_lib.ModelConfig.from_config(config.model, tokenizer_lib.vocab_size(tok))
  trainer = state.Trainer(model_cfg, t, mesh, rule_table, num_steps)
  jax.block_until_ready(trainer.state)
  setup_s = time.perf_counter() - began

  # Compile every shape the pass will use, on a throwaway state (the step donates its input).
  first_of_shape = {}
  for s in range(num_steps):
    idx = plan.indices(s)
    first_of_shape.setdefault(layout.collate(enc, idx, np.ones(len(idx))).tokens_GxRxL.shape, idx)
  start = time.perf_counter()
  for idx in first_of_shape.values():
    metrics = trainer.step(layout.collate(enc, idx, np.ones(len(idx))))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  trainer.reset()
  jax.block_until_ready(trainer.state)
  cache_before = trainer.train_step._cache_size()  # pylint: disable=protected-access

  # The timed pass: as in train_and_evaluate's loop.
  padded = real = 0
  ends, pending = [], None
  start = time.perf_counter()
  iterator = iter(pipeline.train_dataset(plan, num_steps, layout))
  for _ in range(num_steps):
    batch = next(iterator)
    padded += batch.tokens_GxRxL.size
    real += batch.real_tokens()
    metrics = trainer.step(batch)
    if pending is not None:
      jax.device_get(pending)
      ends.append(time.perf_counter())
    pending = metrics
  loss = float(jax.device_get(pending)["loss"]) / t.batch_size
  ends.append(time.perf_counter())
  val = tokenizer_lib.Encoded(ids=val_ids, margin=np.zeros(len(val_ids), np.float32), pairs=[None] * len(val_ids))
  evaluation = pipeline.eval_batches(val, np.arange(len(val)), t.eval_batch_size,
                                     pipeline.bucket_lengths(config.data.max_length, config.data.num_buckets),
                                     tok.pad_token_id)
  val_accuracy = trainer.evaluate(evaluation)[0]["accuracy"]
  return _summarise(ends, start, padded, real, setup_s, compile_s, final_loss=loss, val_accuracy=val_accuracy,
                    distinct_shapes=sorted(first_of_shape),
                    recompiles_after_warmup=trainer.train_step._cache_size() - cache_before)  # pylint: disable=protected-access


def _trl_child(workdir: str) -> dict:
  began = time.perf_counter()
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  config, ids, _, val_ids = _load_workdir(workdir)
  t, d, m = config.train, config.data, config.model
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(workdir, "tokenizer"))
  dataset = datasets.Dataset.from_dict({"chosen_ids": [a.tolist() for a, _ in ids],
                                        "rejected_ids": [b.tolist() for _, b in ids]})
  num_steps = len(ids) // t.batch_size
  torch.manual_seed(t.seed)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      head_dim=m.head_dim or m.hidden_size // m.num_heads, hidden_act="silu", max_position_embeddings=d.max_length,
      rms_norm_eps=m.norm_eps, tie_word_embeddings=False, attention_bias=False, num_labels=1,
      rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.02)
  model = transformers.LlamaForSequenceClassification(hf_cfg).to(torch.float32)
  args = trl.RewardConfig(
      output_dir=os.path.join(workdir, "trl_out"), max_length=d.max_length, per_device_train_batch_size=t.batch_size,
      max_steps=num_steps, learning_rate=t.learning_rate, adam_beta1=t.adam_b1, adam_beta2=t.adam_b2,
      adam_epsilon=t.adam_eps, weight_decay=t.weight_decay, max_grad_norm=t.grad_clip_norm or 0.0,
      warmup_steps=t.warmup_steps, lr_scheduler_type="cosine_with_min_lr",
      lr_scheduler_kwargs={"min_lr_rate": t.end_learning_rate_factor}, bf16=False, fp16=False,
      gradient_checkpointing=False, disable_dropout=True, eval_strategy="no", save_strategy="no", report_to="none",
      logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=t.seed,
      center_rewards_coefficient=t.center_rewards_coef or None)

  counts = {"padded": 0, "real": 0}
  marks = {"start": 0.0, "ends": []}

  class Timer(transformers.TrainerCallback):

    def on_train_begin(self, *a, **k):
      marks["start"] = time.perf_counter()

    def on_step_end(self, *a, **k):
      marks["ends"].append(time.perf_counter())

  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                              callbacks=[Timer()])
  collate = trainer.data_collator

  def counting(examples):
    batch = collate(examples)
    counts["padded"] += batch["input_ids"].numel()
    counts["real"] += int(batch["attention_mask"].sum())
    return batch

  trainer.data_collator = counting
  setup_s = time.perf_counter() - began
  out = trainer.train()
  ends = list(marks["ends"])
  model.eval()
  correct = []
  with torch.no_grad():  # Validation: each side's reward, right-padded batches, ties count half (loss.correct).
    for start in range(0, len(val_ids), t.eval_batch_size):
      chunk = [seq for pair in val_ids[start:start + t.eval_batch_size] for seq in pair]
      width = max(len(x) for x in chunk)
      tokens = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
      mask = torch.zeros((len(chunk), width), dtype=torch.long)
      for i, x in enumerate(chunk):
        tokens[i, :len(x)], mask[i, :len(x)] = torch.as_tensor(x), 1
      r = model(input_ids=tokens, attention_mask=mask).logits[:, 0].reshape(-1, 2)
      diff = (r[:, 0] - r[:, 1]).numpy()
      correct += list(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0)))
  return _summarise(ends, marks["start"], counts["padded"], counts["real"], setup_s, 0.0,
                    val_accuracy=float(np.mean(correct)), final_loss=float(out.training_loss), torch_threads=torch.get_num_threads(),
                    trl_version=trl.__version__)


def main(argv):
  del argv
  if _CHILD.value:
    children = {"jax": _jax_child, "graph": lambda w: _jax_child(w, group_by_prompt=True), "trl": _trl_child}
    result = children[_CHILD.value](_WORKDIR.value)
    with open(os.path.join(_WORKDIR.value, f"result_{_CHILD.value}.json"), "w") as f:
      json.dump(result, f)
    return
  _parent(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
