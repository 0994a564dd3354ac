"""Training: `train_and_evaluate(config, workdir)` runs a whole reward-model job and returns its summary."""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from jaxreward import analysis, checkpoint, configuration, corpus, evaluate, gate, loss, memory, model as model_lib
from jaxreward import optimizer, packing, pipeline, preemption, preflight, report, rundir, sharding, tensorboard
from jaxreward import tokenizer as tokenizer_lib


class NonFiniteLoss(RuntimeError):
  pass


def log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer state
# ---------------------------------------------------------------------------------------------------------------


def create_state(model_cfg: model_lib.ModelConfig, tx, mesh, rule_table, seed: int):
  """Builds parameters and Adam state directly in their shardings: no full copy on any one device."""

  def init():
    model = model_lib.RewardModel(model_cfg, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
    abstract = nnx.eval_shape(lambda: model_lib.RewardModel(model_cfg, nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    params_shardings = sharding.state_shardings(abstract_params, mesh, rule_table)
    abstract_state = jax.eval_shape(init)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Adam moments take their parameter's sharding; scalars (step, counts) are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], params_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"step": replicated, "params": params_shardings, "opt_state": opt_shardings}
    state = jax.jit(init, out_shardings=state_shardings)()
  return graphdef, state, state_shardings


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------


def make_train_step(graphdef, tx, schedule, center_coef: float, grad_accum_steps: int = 1):
  """The pure step: (state, batch) -> (state, metrics).

  With `grad_accum_steps` = A > 1 the batch is processed as A microbatches in a scan; gradients of the summed
  loss are accumulated and divided by the real pair count once, so the update equals the big batch's.
  A step whose loss or gradient is not finite leaves the state untouched (metrics report it).
  """

  def sum_loss(params, micro):
    model = nnx.merge(graphdef, params)
    if "ends_GxBxP" in micro:  # Packed rows (packing.py): groups of pairs flatten back into pairs.
      r_Bx2 = model.score_packed(micro["tokens_GxRxL"], micro["positions_GxRxL"], micro["segments_GxRxL"],
                                 micro["ends_GxBxP"]).reshape(-1, 2)
      weight_B, margin_B = micro["weight_GxB"].reshape(-1), micro["margin_GxB"].reshape(-1)
    else:
      r_Bx2 = model.score_pairs(micro["tokens_BxPxL"], micro["lengths_BxP"])
      weight_B, margin_B = micro["weight_B"], micro["margin_B"]
    sums = loss.batch_sums(r_Bx2, weight_B, margin_B, center_coef)
    return sums["loss"], sums

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(params, batch)
    else:
      # Rows (or packing groups) i::A form microbatch i, so each device's rows split locally without moving data.
      micro_AxB = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, micro):
        (_, sums), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

      (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_AxB))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (sums_shape, grads_shape))
      (sums, grads), _ = jax.lax.scan(accumulate, zeros, micro_AxB)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = dict(sums, grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                   skipped=1.0 - finite.astype(jnp.float32))
    return {"step": state["step"] + 1, "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"])}, metrics

  return train_step


def jit_train_step(train_step, state_shardings, mesh, rule_table, batch_keys=evaluate.BUCKETED_KEYS):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_shardings, evaluate.batch_shardings(mesh, rule_table, batch_keys)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_plan(config, enc) -> pipeline.TrainPlan:
  # Packed batches are drawn unsorted: any mix of lengths packs well, while length-sorted batches vary so much
  # in row count that they need many more row buckets (ETHICS: 16-20% padding instead of 4%).
  d, t = config.data, config.train
  return pipeline.TrainPlan(enc, t.batch_size, 1 if d.packing else d.sort_window, t.seed)


def make_layout(config, plan, batch_shards: int, pad_id: int, process_index: int, process_count: int):
  """(layout, batch keys, description) of training batches: packed rows or length buckets (pipeline.py)."""
  d, t = config.data, config.train
  if d.packing:
    layout = packing.PackedLayout(d.pack_length or d.max_length, batch_shards * t.grad_accum_steps, t.batch_size,
                                  pad_id)
    pipeline.host_rows(layout.groups, process_index, process_count, "packing groups (data x fsdp x grad_accum_steps)")
    layout.fit_buckets([layout.rows_needed(plan.enc, idx) for idx in plan.epoch(0)], d.num_buckets)
    return layout, packing.KEYS, (f"packed into {layout.groups} group(s) of {layout.row_buckets} rows x "
                                  f"{layout.row_length}")
  buckets = pipeline.bucket_lengths(d.max_length, d.num_buckets)
  pipeline.host_rows(t.batch_size, process_index, process_count)
  return pipeline.BucketedLayout(buckets, pad_id), evaluate.BUCKETED_KEYS, f"buckets {buckets}"


def total_steps(train_cfg, batches_per_epoch: int) -> int:
  if train_cfg.num_steps:
    return int(train_cfg.num_steps)
  return max(1, int(math.ceil(train_cfg.num_epochs * batches_per_epoch)))


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates, checkpoints and reports; returns the summary written to metrics.json.

  The work dir is checked and locked first (rundir.py): a refused run changes nothing in it."""
  configuration.validate(config)
  with rundir.open_run(workdir, config.copy_and_resolve_references(), log) as run_dir:
    return _train_and_evaluate(config, workdir, run_dir)


def _train_and_evaluate(config, workdir: str, run_dir: rundir.RunDir) -> dict:
  started = time.time()
  configuration.validate(config)
  config = config.copy_and_resolve_references()  # The run records derived values (vocab size) in its own copy.
  if config.train.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  rule_table = sharding.rules(config.mesh)
  t = config.train
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key, multiple in (("batch_size", batch_shards * t.grad_accum_steps), ("eval_batch_size", batch_shards)):
    if t[key] % multiple:
      raise configuration.ConfigError(f"config: train.{key}={t[key]} must be a multiple of data x fsdp"
                                      f"{' x grad_accum_steps' if key == 'batch_size' else ''} = {multiple} "
                                      f"(mesh {sharding.describe(mesh)})")

  if config.model.init_from:
    preflight.check_init_from(config, log)
  prepared = corpus.prepare(config, log)
  tok = prepared.tokenizer
  if config.model.init_from:
    from jaxreward import hf  # pylint: disable=g-import-not-at-top
    model_cfg = hf.model_config(config.model.init_from, config.model)
  else:
    model_cfg = model_lib.ModelConfig.from_config(config.model, config.model.vocab_size or tokenizer_lib.vocab_size(tok))
  if model_cfg.vocab_size < tokenizer_lib.vocab_size(tok):
    raise configuration.ConfigError(f"config: the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
                                    f"tokenizer's ({tokenizer_lib.vocab_size(tok)}); token ids would fall outside it")
  config.model.vocab_size = model_cfg.vocab_size  # Recorded in config.json so the work dir rebuilds exactly.
  preflight.check_memory(config, model_cfg, dict(mesh.shape), log)
  buckets = pipeline.bucket_lengths(config.data.max_length, config.data.num_buckets)
  pid, nproc = jax.process_index(), jax.process_count()
  plan = make_plan(config, prepared.train)
  num_steps = total_steps(t, plan.batches_per_epoch)
  num_epochs = -(-num_steps // plan.batches_per_epoch)
  layout, batch_keys, shapes = make_layout(config, plan, batch_shards, tok.pad_token_id, pid, nproc)
  padding_by_epoch = [plan.padding_fraction(e, layout) for e in range(num_epochs)]
  padding = float(np.mean(padding_by_epoch))
  log(f"data: {len(prepared.train)} train / {len(prepared.validation)} validation pairs; {num_steps} steps "
      f"({plan.batches_per_epoch} per epoch); {shapes}; padding {padding:.1%} of token slots")

  tx, schedule = optimizer.make(t, num_steps)
  graphdef, state, state_shardings = create_state(model_cfg, tx, mesh, rule_table, t.seed)
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  log(f"model: {num_params:,} parameters; mesh {sharding.describe(mesh)}; "
      f"{sharding.per_device_bytes(state) / 2**20:.1f} MiB of parameters + optimizer state per device")
  log(memory.render(memory.from_config(config, model_cfg, dict(mesh.shape))))
  run_dir.record()
  if is_main:
    tokenizer_lib.save(tok, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_step = jit_train_step(make_train_step(graphdef, tx, schedule, t.center_rewards_coef, t.grad_accum_steps),
                              state_shardings, mesh, rule_table, batch_keys)
  train_batch_shardings = evaluate.batch_shardings(mesh, rule_table, batch_keys)
  batch_shardings = evaluate.batch_shardings(mesh, rule_table)
  eval_step = evaluate.make_eval_step(graphdef, state_shardings["params"], mesh, rule_table)
  val_batches = pipeline.eval_batches(prepared.validation, np.arange(len(prepared.validation)), t.eval_batch_size,
                                      buckets, tok.pad_token_id, pid, nproc)
  sample = np.random.default_rng([t.seed, 1]).permutation(len(prepared.train))[:t.train_eval_pairs]
  train_sample_batches = pipeline.eval_batches(prepared.train, np.sort(sample), t.eval_batch_size, buckets,
                                               tok.pad_token_id, pid, nproc)

  # --- Resume ----------------------------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, t.keep_best)
  start_step, iterator = 0, iter(pipeline.train_dataset(plan, num_steps, layout, pid, nproc))
  restored_step, state, _ = ckpt.restore_latest(state, iterator.set_state, log)
  if restored_step is not None:
    start_step = restored_step
    log(f"resumed from step {start_step} in {ckpt.directory}")
  elif config.model.init_from:
    state["params"] = hf.load_params(config.model.init_from, state["params"])
    log(f"model: weights loaded from {config.model.init_from}")
  history = report.MetricsLog(workdir, start_step, is_main, tensorboard.Writer(workdir, enabled=is_main))

  # --- Loop ------------------------------------------------------------------------------------------------
  def evaluate_and_save(step):
    val, _ = evaluate.run(eval_step, state["params"], val_batches, batch_shardings)
    train_eval, _ = evaluate.run(eval_step, state["params"], train_sample_batches, batch_shardings)
    row = {"kind": "eval", "step": step, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
           "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"],
           "overfitting_gap": train_eval["accuracy"] - val["accuracy"], "val_reward_mean": val["reward"],
           "val_reward_std": val["reward_std"], "val_margin": val["margin"],
           "interval_train_loss": interval.mean("loss")}
    history.write(row)
    ckpt.save(step, state, iterator.get_state(), {"val_accuracy": val["accuracy"], "val_loss": val["loss"]})
    log(f"step {step}: val acc {val['accuracy']:.4f} loss {val['loss']:.4f} | train acc "
        f"{train_eval['accuracy']:.4f} loss {train_eval['loss']:.4f} | gap {row['overfitting_gap']:+.4f}")
    interval.reset()

  interval, window, skipped_steps = _Running(), _Running(), []
  bar = tqdm.tqdm(total=num_steps, initial=start_step, disable=not (t.progress_bar and is_main), unit="step",
                  dynamic_ncols=True, file=sys.stderr)
  pending = None  # (step, metrics on device): fetched one step late so dispatch never waits.

  def consume(step, metrics):
    host = jax.device_get(metrics)
    m = loss.finalize(host) | {k: float(host[k]) for k in ("grad_norm", "learning_rate")}
    if host["skipped"]:
      if t.nan_policy == "stop":
        ckpt.wait()  # Commits a save still in flight before the run ends.
        last = ckpt.latest_step()
        ckpt.close()
        raise NonFiniteLoss(f"non-finite loss {m['loss']} or gradient norm {m['grad_norm']} at step {step}; "
                            f"the last checkpoint (step {last}) in {ckpt.directory} is intact: lower "
                            "train.learning_rate in a new --workdir or continue it with "
                            "--config.train.resume=force; or set train.nan_policy=skip")
      skipped_steps.append(step)
      log(f"step {step}: non-finite loss or gradient; update skipped ({len(skipped_steps)} so far)")
      bar.update(1)
      return
    interval.add(m)
    window.add(m)
    bar.update(1)
    bar.set_postfix(loss=f"{window.mean('loss'):.4f}", acc=f"{window.mean('accuracy'):.3f}")
    if step % t.log_every == 0 or step == num_steps:
      history.write({"kind": "train", "step": step, **{k: window.mean(k) for k in window.sums}})
      window.reset()

  stop = preemption.StopSignal()
  for step in range(start_step + 1, num_steps + 1):
    if (step - 1) % plan.batches_per_epoch == 0:
      epoch = (step - 1) // plan.batches_per_epoch
      history.write({"kind": "epoch", "step": step, "epoch": epoch, "padding_fraction": padding_by_epoch[epoch]})
      if epoch:
        log(f"epoch {epoch} from step {step}: padding {padding_by_epoch[epoch]:.1%} of token slots")
    batch = evaluate.to_device(next(iterator), train_batch_shardings)
    state, metrics = train_step(state, batch)
    if pending is not None:
      consume(*pending)
    pending = (step, metrics)
    at_eval = step % t.eval_every == 0 or step == num_steps
    # Across hosts the signal check is a collective: gather at log cadence, not every step.
    signalled = stop.requested(step, gather=step % t.log_every == 0)
    stopping = step < num_steps and (signalled or step - start_step == t.max_steps_per_run)
    if at_eval or stopping:
      consume(*pending)  # Never checkpoint a state whose loss was not checked.
      pending = None
      if at_eval:
        evaluate_and_save(step)
      else:  # A resume-only checkpoint: never a candidate for "best".
        ckpt.save(step, state, iterator.get_state(), None)
    if stopping:
      ckpt.wait()
      bar.close()
      history.close()
      stop.restore()
      log(f"stopped at step {step} ({'signal' if signalled else 'train.max_steps_per_run'}); "
          f"re-run with the same --workdir to continue")
      return {"stopped_at": step, "gate_pass": False, "preempted": True}
  stop.restore()
  bar.close()
  ckpt.wait()

  # --- Report ----------------------------------------------------------------------------------------------
  evals = history.evals()
  best_step = ckpt.best_step()
  best = next(r for r in evals if r["step"] == best_step)
  verdict = gate.judge(best, [r["interval_train_loss"] for r in evals if r["interval_train_loss"] is not None],
                       config.gate)
  # Error analysis of the best checkpoint on the validation split: baselines, length bias, calibration.
  best_state, _ = ckpt.restore(best_step, state)
  _, best_rewards = evaluate.run(eval_step, best_state["params"], val_batches, batch_shardings)
  del best_state
  validation_analysis = analysis.for_training(
      prepared.validation, best_rewards, os.path.join(workdir, "reliability.png") if is_main else None)
  warning = analysis.length_warning(validation_analysis)
  if warning:
    verdict["warnings"] = [warning]
  summary = {
      "train_accuracy": best["train_accuracy"], "val_accuracy": best["val_accuracy"],
      "overfitting_gap": best["overfitting_gap"], "val_loss": best["val_loss"], "train_loss": best["train_loss"],
      "val_reward_mean": best["val_reward_mean"], "val_reward_std": best["val_reward_std"],
      "num_parameters": int(num_params), "vocab_size": model_cfg.vocab_size, "training_steps": num_steps,
      "best_step": best_step, "latest_step": ckpt.latest_step(), "random_baseline_accuracy": 0.5,
      "padding_fraction": padding, "padding_fraction_by_epoch": padding_by_epoch, "packing": config.data.packing,
      "mesh": sharding.describe(mesh), "wall_time_s": time.time() - started,
      "gate": verdict, "gate_pass": verdict["pass"], "skipped_steps": skipped_steps,
      "validation_analysis": validation_analysis, "forced_resumes": run_dir.forced_resumes,
      **{k: v for k, v in prepared.stats.items()},
  }
  gate_text = gate.render(verdict)
  if is_main:
    report.write_json(os.path.join(workdir, "metrics.json"), summary)
    report.plot_curves(history.rows, os.path.join(workdir, "learning_curves.png"))
    with open(os.path.join(workdir, "README.md"), "w") as f:
      f.write(report.model_card(summary, config, gate_text, analysis.render_markdown(validation_analysis)))
    print(gate_text, flush=True)
  history.close()
  ckpt.close()
  return summary


class _Running:
  """Means of step metrics over a stretch of steps."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.sums, self.n = {}, 0

  def add(self, m: dict):
    for k, v in m.items():
      if k != "count":
        self.sums[k] = self.sums.get(k, 0.0) + v
    self.n += 1

  def mean(self, key):
    return self.sums[key] / self.n if self.n else None
