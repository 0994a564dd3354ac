"""The train state and the compiled steps that move it, held together in one `Trainer`.

  trainer = Trainer(model_cfg, config.train, mesh, rule_table, num_steps)
  metrics = trainer.step(batch)                  # host batch -> device, one jitted, sharded update
  means, r_Nx2 = trainer.evaluate(batches)       # the eval step over fixed batches

The state is a dict {step, params, opt_state} created directly in its shardings (no full copy on any one
device); the train step donates it. Batches are sharded on their leading axis (pairs or packing groups) by the
config's "batch" rule and replicated elsewhere: one sharding for every leaf, whatever the layout.
train.py, tools/bench.py, tools/bench_vs_trl.py and the tests all build training through this class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreward import loss, model as model_lib, optimizer, pipeline, sharding


def abstract_params(model_cfg: model_lib.ModelConfig, seed: int = 0):
  """(graphdef, abstract params): shapes, dtypes and logical axes without allocating anything."""
  abstract = nnx.eval_shape(lambda: model_lib.RewardModel(model_cfg, nnx.Rngs(seed)))
  return nnx.split(abstract, nnx.Param)


def params_target(model_cfg: model_lib.ModelConfig, mesh, rule_table):
  """(graphdef, abstract params carrying their shardings): what a checkpoint's parameters restore onto."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
    graphdef, abstract = abstract_params(model_cfg)
    shardings = sharding.state_shardings(abstract, mesh, rule_table)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_state(model_cfg: model_lib.ModelConfig, tx, mesh, rule_table, seed: int):
  """(graphdef, state, state shardings): parameters and Adam state built directly in their shardings."""

  def init():
    model = model_lib.RewardModel(model_cfg, nnx.Rngs(seed))
    _, params = nnx.split(model, nnx.Param)
    trained, _ = optimizer.split_trained(params)  # Adam state for the trained parameters only.
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trained)}

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
    graphdef, abstract = abstract_params(model_cfg, seed)
    params_shardings = sharding.state_shardings(abstract, mesh, rule_table)
    abstract_state = jax.eval_shape(init)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Adam moments take their parameter's sharding; scalars (step, counts) are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"],
                                          optimizer.split_trained(params_shardings)[0],
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"step": replicated, "params": params_shardings, "opt_state": opt_shardings}
    state = jax.jit(init, out_shardings=state_shardings)()
  return graphdef, state, state_shardings


def batch_rewards(model, batch: pipeline.Batch):
  """(r_Bx2, weight_B, margin_B) of a batch, packed or not: the one path from a batch to the loss."""
  r_Bx2 = model.score(batch.tokens_GxRxL, batch.ends_GxBxP, batch.positions_GxRxL, batch.segments_GxRxL,
                      batch.branches_GxRxL)
  return r_Bx2.reshape(-1, 2), batch.weight_GxB.reshape(-1), batch.margin_GxB.reshape(-1)


def winners(batch: pipeline.Batch):
  """An id per pair naming its chosen response's slot (its EOS), equal for pairs that share that response."""
  g, r, l = batch.tokens_GxRxL.shape
  return (batch.ends_GxBxP[:, :, 0] + (jnp.arange(g) * r * l)[:, None]).reshape(-1)


def make_train_step(graphdef, tx, schedule, center_coef: float, grad_accum_steps: int = 1,
                    objective: str = "bradley_terry"):
  """The pure step: (state, batch) -> (state, metrics).

  With `grad_accum_steps` = A > 1 the batch is processed as A microbatches in a scan; gradients of the summed
  loss are accumulated and divided by the real pair count once, so the update equals the big batch's.
  A step whose loss or gradient is not finite leaves the state untouched (metrics report it).
  """

  def sum_loss(params, frozen, micro):
    winner_B = winners(micro) if objective == "plackett_luce" else None
    sums = loss.batch_sums(*batch_rewards(nnx.merge(graphdef, params, frozen), micro), center_coef, winner_B)
    return sums["loss"], sums

  # Differentiates the trained parameters only (optimizer.split_trained): the frozen ones get no gradient.
  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def train_step(state, batch):
    params, frozen = optimizer.split_trained(state["params"])
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(params, frozen, batch)
    else:
      # Groups i::A form microbatch i, so each device's groups split locally without moving data.
      micro_AxB = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, micro):
        (_, sums), grads = grad_fn(params, frozen, micro)
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

      (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro_AxB))
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
    return {"step": state["step"] + 1, "params": nnx.merge_state(keep(new_params, params), frozen),
            "opt_state": keep(opt_state, state["opt_state"])}, metrics

  return train_step


def make_eval_step(graphdef, params_shardings, mesh, rule_table):
  """(params, batch) -> (sums, r_Bx2, weight_B), replicated so every host reads the global batch's values."""

  def eval_step(params, batch):
    r_Bx2, weight_B, margin_B = batch_rewards(nnx.merge(graphdef, params), batch)
    return loss.batch_sums(r_Bx2, weight_B, margin_B), r_Bx2, weight_B

  return jax.jit(eval_step, in_shardings=(params_shardings, pipeline.Batch.sharding(mesh, rule_table)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(eval_step, params, evaluation: pipeline.EvalBatches, batch_sharding) -> tuple[dict, np.ndarray]:
  """Means over all real pairs, and their [N, 2] rewards in the order of the indices the batches were made of."""
  total, rewards, pending = None, [], None
  for batch in evaluation.batches:
    out = eval_step(params, batch.on_device(batch_sharding))
    if pending is not None:  # Fetch one batch late so the device never waits for the host.
      total = _accumulate(total, rewards, pending)
    pending = out
  if pending is not None:
    total = _accumulate(total, rewards, pending)
  r_Nx2 = np.zeros((len(evaluation.positions), 2), np.float32)
  if rewards:
    r_Nx2[evaluation.positions] = np.concatenate(rewards)
  return loss.finalize(total), r_Nx2


def _accumulate(total, rewards, out):
  sums, r_Bx2, weight_B = jax.device_get(out)
  rewards.append(np.asarray(r_Bx2)[np.asarray(weight_B) > 0])
  return sums if total is None else {k: total[k] + sums[k] for k in total}


class Trainer:
  """The state on the mesh, the jitted train step (explicit shardings, state donated) and the eval step."""

  def __init__(self, model_cfg: model_lib.ModelConfig, train_cfg, mesh, rule_table, num_steps: int):
    self.model_cfg, self.mesh, self.rule_table = model_cfg, mesh, rule_table
    self.seed = train_cfg.seed
    self.tx, self.schedule = optimizer.make(train_cfg, num_steps)
    self.graphdef, self.state, self.state_shardings = create_state(model_cfg, self.tx, mesh, rule_table, self.seed)
    self.batch_sharding = pipeline.Batch.sharding(mesh, rule_table)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.train_step = jax.jit(
        make_train_step(self.graphdef, self.tx, self.schedule, train_cfg.center_rewards_coef,
                        train_cfg.grad_accum_steps, train_cfg.loss),
        in_shardings=(self.state_shardings, self.batch_sharding), out_shardings=(self.state_shardings, replicated),
        donate_argnums=0)
    self.eval_step = make_eval_step(self.graphdef, self.state_shardings["params"], mesh, rule_table)

  def step(self, batch: pipeline.Batch):
    """One update on a host batch (this host's groups); returns the step's metrics, still on device."""
    self.state, metrics = self.train_step(self.state, batch.on_device(self.batch_sharding))
    return metrics

  def evaluate(self, evaluation: pipeline.EvalBatches, params=None) -> tuple[dict, np.ndarray]:
    return evaluate(self.eval_step, self.state["params"] if params is None else params, evaluation,
                    self.batch_sharding)

  def reset(self) -> None:
    """A fresh initial state (e.g. after compiling on a throwaway one)."""
    self.state = None  # Freed first: two live states would double the peak memory (1.6 GB at SmolLM2-135M).
    _, self.state, _ = create_state(self.model_cfg, self.tx, self.mesh, self.rule_table, self.seed)

  def num_parameters(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state["params"]))
