"""Training: `train_and_evaluate(config, workdir)` runs a whole reward-model job and returns its summary."""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import numpy as np
import tqdm

from jaxreward import checkpoint, configuration, corpus, hf, hosts, loss, memory, model as model_lib
from jaxreward import pipeline, preemption, preflight, report, rundir, sharding, state as state_lib, storage
from jaxreward import tokenizer as tokenizer_lib, weights


class NonFiniteLoss(RuntimeError):
  pass


def log(message: str) -> None:
  if hosts.is_main():
    tqdm.tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Mesh, data, model
# ---------------------------------------------------------------------------------------------------------------


def total_steps(train_cfg, batches_per_epoch: int) -> int:
  if train_cfg.num_steps:
    return int(train_cfg.num_steps)
  return max(1, int(math.ceil(train_cfg.num_epochs * batches_per_epoch)))


@dataclasses.dataclass
class RunData:
  """Everything the loop reads: the prepared corpus, the step plan and layout, the fixed evaluation batches."""
  prepared: corpus.PreparedData
  plan: pipeline.TrainPlan
  layout: object
  num_steps: int
  padding_by_epoch: list[float]
  validation: pipeline.EvalBatches
  train_sample: pipeline.EvalBatches


def make_data(config, mesh, workdir: str) -> RunData:
  t, d = config.train, config.data
  if config.model.init_from:
    preflight.check_init_from(config, log)
  prepared = corpus.prepare(config, log, workdir)
  pad_id, batch_sharding = prepared.tokenizer.pad_token_id, pipeline.Batch.sharding(mesh, sharding.rules(config.mesh))
  plan = pipeline.make_plan(config, prepared.train)
  num_steps = total_steps(t, plan.batches_per_epoch)
  layout, shapes = pipeline.make_layout(config, plan, mesh.shape["data"] * mesh.shape["fsdp"], pad_id)
  padding_by_epoch = [plan.padding_fraction(e, layout) for e in range(-(-num_steps // plan.batches_per_epoch))]
  log(f"data: {len(prepared.train)} train / {len(prepared.validation)} validation pairs; {num_steps} steps "
      f"({plan.batches_per_epoch} per epoch); {shapes}; padding {np.mean(padding_by_epoch):.1%} of token slots")
  buckets = pipeline.bucket_lengths(d.max_length, d.num_buckets)
  validation = pipeline.eval_batches(prepared.validation, np.arange(len(prepared.validation)), t.eval_batch_size,
                                     buckets, pad_id, batch_sharding)
  sample = np.random.default_rng([t.seed, 1]).permutation(len(prepared.train))[:t.train_eval_pairs]
  train_sample = pipeline.eval_batches(prepared.train, np.sort(sample), t.eval_batch_size, buckets, pad_id,
                                      batch_sharding)
  return RunData(prepared, plan, layout, num_steps, padding_by_epoch, validation, train_sample)


def model_config(config, tok) -> model_lib.ModelConfig:
  """The architecture: an HF folder's (model.init_from) or the config's; records the vocabulary in `config`."""
  if config.model.init_from:
    model_cfg = hf.model_config(config.model.init_from, config.model)
  else:
    model_cfg = model_lib.ModelConfig.from_config(config.model, config.model.vocab_size or tokenizer_lib.vocab_size(tok))
  if model_cfg.vocab_size < tokenizer_lib.vocab_size(tok):
    raise configuration.ConfigError(f"config: the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
                                    f"tokenizer's ({tokenizer_lib.vocab_size(tok)}); token ids would fall outside it")
  config.model.vocab_size = model_cfg.vocab_size  # Recorded in config.json so the work dir rebuilds exactly.
  return model_cfg


def make_mesh(config):
  """The mesh, once the batch sizes are known to split over it."""
  mesh = sharding.make_mesh(config.mesh)
  t, batch_shards = config.train, mesh.shape["data"] * mesh.shape["fsdp"]
  for key, multiple in (("batch_size", batch_shards * t.grad_accum_steps), ("eval_batch_size", batch_shards)):
    if t[key] % multiple:
      raise configuration.ConfigError(f"config: train.{key}={t[key]} must be a multiple of data x fsdp"
                                      f"{' x grad_accum_steps' if key == 'batch_size' else ''} = {multiple} "
                                      f"(mesh {sharding.describe(mesh)})")
  return mesh


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates, checkpoints and reports; returns the summary written to metrics.json.

  The config is validated (once: main.py leaves it to this) before this process joins a multi-host job, and
  the work dir checked and locked next (rundir.py): a refused run changes nothing in it."""
  configuration.validate(config)
  sharding.initialize_processes(config.distributed)  # Before any device is touched; a no-op for one process.
  with rundir.open_run(workdir, config.copy_and_resolve_references(), log) as run_dir:
    return _train_and_evaluate(config, workdir, run_dir)


def _train_and_evaluate(config, workdir: str, run_dir: rundir.RunDir) -> dict:
  started = time.time()
  config = config.copy_and_resolve_references()  # The run records derived values (vocab size) in its own copy.
  if config.train.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  is_main, t = hosts.is_main(), config.train

  mesh = make_mesh(config)
  rule_table = sharding.rules(config.mesh)
  data = make_data(config, mesh, workdir)
  tok, plan, num_steps, padding_by_epoch = data.prepared.tokenizer, data.plan, data.num_steps, data.padding_by_epoch
  model_cfg = model_config(config, tok)
  preflight.check_memory(config, model_cfg, dict(mesh.shape), log)
  trainer = state_lib.Trainer(model_cfg, t, mesh, rule_table, num_steps)
  num_params = trainer.num_parameters()
  log(f"model: {num_params:,} parameters; mesh {sharding.describe(mesh)}; "
      f"{sharding.per_device_bytes(trainer.state) / 2**20:.1f} MiB of parameters + optimizer state per device")
  log(memory.render(memory.from_config(config, model_cfg, dict(mesh.shape))))
  run_dir.record()
  if is_main:
    tokenizer_lib.save(tok, workdir)
    storage.write_atomically(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  # --- Resume ----------------------------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, t.keep_best)
  hosts.check_host_rows(plan, data.layout, trainer.batch_sharding)
  start_step, iterator = 0, iter(pipeline.train_dataset(plan, num_steps, data.layout, trainer.batch_sharding))
  restored_step, trainer.state, _ = ckpt.restore_latest(trainer.state, iterator.set_state, log)
  if restored_step is not None:
    start_step = restored_step
    log(f"resumed from step {start_step} in {ckpt.directory}")
  elif config.model.init_from:
    reader = weights.Reader(config.model.init_from)
    trainer.state["params"] = hf.load_params(config.model.init_from, trainer.state["params"], reader)
    log(f"model: weights loaded from {config.model.init_from} ({reader.bytes_read / 2**20:.1f} MiB read by this "
        "host: the slices its devices hold)")
  history = report.MetricsLog(workdir, start_step, is_main)

  # --- Loop ------------------------------------------------------------------------------------------------
  def evaluate_and_save(step):
    val, _ = trainer.evaluate(data.validation)
    train_eval, _ = trainer.evaluate(data.train_sample)
    row = {"kind": "eval", "step": step, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
           "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"],
           "overfitting_gap": train_eval["accuracy"] - val["accuracy"], "val_reward_mean": val["reward"],
           "val_reward_std": val["reward_std"], "val_margin": val["margin"],
           "interval_train_loss": interval.mean("loss")}
    history.write(row)
    ckpt.save(step, trainer.state, iterator.get_state(), {"val_accuracy": val["accuracy"], "val_loss": val["loss"]})
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
        # The step applies an update only when it is finite, so the state as it stands holds checked updates
        # alone (the bad step's is not in it): save it, whichever step the one-step-late fetch let it reach.
        last = int(jax.device_get(trainer.state["step"]))
        if last not in ckpt.all_steps():
          history.flush()
          ckpt.save(last, trainer.state, iterator.get_state(), None)
        ckpt.wait()  # Committed before the run ends.
        ckpt.close()
        raise NonFiniteLoss(f"non-finite loss {m['loss']} or gradient norm {m['grad_norm']} at step {step}; "
                            f"its update was not applied, and the state after step {last} is saved in "
                            f"{ckpt.directory}: lower train.learning_rate in a new --workdir or continue it with "
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
    metrics = trainer.step(next(iterator))
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
        history.flush()  # A remote work dir's rows reach the store before the checkpoint that follows them.
        ckpt.save(step, trainer.state, iterator.get_state(), None)
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
  best_step = ckpt.best_step()
  best_params = ckpt.restore_params(best_step, trainer.state["params"], lambda: trainer.state)
  _, best_rewards = trainer.evaluate(data.validation, best_params)
  del best_params
  facts = {"num_parameters": int(num_params), "vocab_size": model_cfg.vocab_size, "training_steps": num_steps,
           "latest_step": ckpt.latest_step(), "padding_fraction": float(np.mean(padding_by_epoch)),
           "padding_fraction_by_epoch": padding_by_epoch,
           "packing": config.data.packing, "mesh": sharding.describe(mesh), "wall_time_s": time.time() - started,
           "skipped_steps": skipped_steps, "forced_resumes": run_dir.forced_resumes, **data.prepared.stats}
  summary = report.finish(workdir, config, history, best_step, best_rewards, data.prepared.validation, facts, is_main)
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
