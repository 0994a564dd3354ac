"""Prompt trees: every response scored exactly as alone, and the loss and its gradients those of the pairs."""

import dataclasses
import itertools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import load_config

from jaxreward import evaluate, graphs, loss, model as model_lib, pipeline, state, synthetic, tokenizer, train

CFG = model_lib.ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=48, qkv_bias=True, attention="xla")


@pytest.fixture(scope="module")
def enc():
  """Ranked synthetic groups (up to 4 responses a prompt) plus plain pairs: prompts with 1 to 6 pairs."""
  pairs = synthetic.generate_ranked(90, 4, 0) + synthetic.generate(30, 1)
  tok = tokenizer.train_bpe(tokenizer.texts_for_tokenizer(pairs), 300)
  return tokenizer.encode(pairs, tok, 64, "keep_end")


@pytest.fixture(scope="module")
def model():
  with nnx.use_eager_sharding(False):
    return model_lib.RewardModel(CFG, nnx.Rngs(0))


def test_common_prefix_leaves_each_sequence_its_eos():
  a, b = np.array([5, 6, 7, 9, 1]), np.array([5, 6, 8, 1])
  assert graphs.common_prefix([a, b]) == 2
  assert graphs.common_prefix([a, a[:3]]) == 2, "a sequence that is another's prefix keeps one token"
  trees, where = graphs.build_trees([a, b, np.array([5, 6, 7, 2, 1])], 9)
  assert [len(t) for t in trees] == [2 + 3 + 2, 5] and where == [(0, 0), (0, 1), (1, 0)]


def test_plan_keeps_a_prompts_pairs_together(enc):
  plan = pipeline.TrainPlan(enc, 16, 1, seed=0, group_by_prompt=True)
  order = plan.epoch(0).ravel()
  assert len(set(order)) == len(order)
  changes = sum(np.count_nonzero(np.diff(enc.prompt_group[b]) != 0) for b in plan.epoch(0))
  shuffled = pipeline.TrainPlan(enc, 16, 1, seed=0)
  assert changes < 0.5 * sum(np.count_nonzero(np.diff(enc.prompt_group[b]) != 0) for b in shuffled.epoch(0))


def graph_and_pair_batches(enc, indices):
  graph = pipeline.GraphLayout(64, 2, len(indices), pad_id=0)
  graph.fit_buckets([graph.rows_needed(enc, indices)], 1)
  packed = pipeline.PackedLayout(64, 2, len(indices), pad_id=0)
  packed.fit_buckets([packed.rows_needed(enc, indices)], 1)
  weight = np.ones(len(indices))
  return graph.collate(enc, indices, weight), packed.collate(enc, indices, weight), graph, packed


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_tree_rewards_equal_each_sequence_scored_alone(enc, model, attention):
  indices = np.arange(len(enc))[:32]
  graph, _, layout, packed = graph_and_pair_batches(enc, indices)
  assert graph.branches_GxRxL.max() >= 4, "some prompt has several responses in one tree"
  assert layout.computed_tokens(enc, indices) < 0.6 * packed.computed_tokens(enc, indices)
  if attention != "xla":  # The same weights through another kernel.
    with nnx.use_eager_sharding(False):
      model = nnx.merge(nnx.graphdef(model_lib.RewardModel(dataclasses.replace(CFG, attention=attention),
                                                          nnx.Rngs(0))), nnx.state(model))
  score = nnx.jit(lambda m, *a: m.score(*a))
  r_GxBxP = score(model, graph.tokens_GxRxL, graph.ends_GxBxP, graph.positions_GxRxL, graph.segments_GxRxL,
                  graph.branches_GxRxL)
  alone = pipeline.collate(enc, indices, np.ones(len(indices)), [64], 0)
  r_Bx1x2 = score(model, alone.tokens_GxRxL, alone.ends_GxBxP)
  np.testing.assert_allclose(np.asarray(r_GxBxP).reshape(-1, 2), np.asarray(r_Bx1x2).reshape(-1, 2), atol=1e-5)
  # Each EOS lies where the tree put the sequence's last token.
  for g in range(2):
    for b in range(16):
      for p in range(2):
        row, col = divmod(int(graph.ends_GxBxP[g, b, p]), 64)
        assert graph.tokens_GxRxL[g, row, col] == enc.ids[indices[16 * g + b]][p][-1]
        assert graph.positions_GxRxL[g, row, col] == len(enc.ids[indices[16 * g + b]][p]) - 1


def test_graph_loss_and_gradients_equal_the_pairs(enc, model):
  """The same pairs as trees and as packed sequences: equal summed loss and gradients (fp32)."""
  indices = np.arange(len(enc))[8:40]
  graph, packed, _, _ = graph_and_pair_batches(enc, indices)
  graphdef, params = nnx.split(model, nnx.Param)

  def summed(p, batch):
    return loss.batch_sums(*state.batch_rewards(nnx.merge(graphdef, p), batch))["loss"]

  (lg, gg), (lp, gp) = (jax.jit(jax.value_and_grad(summed))(params, b) for b in (graph, packed))
  # Plackett-Luce sees a response that wins several pairs as one winner only where the trees share it.
  assert len(set(np.asarray(state.winners(graph)).tolist())) < 32 == len(set(np.asarray(state.winners(packed)).tolist()))
  np.testing.assert_allclose(lg, lp, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gp), strict=True):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)  # Sums over 32 pairs of fp32 terms.


def test_hosts_lay_out_only_their_groups(enc):
  indices = np.arange(16)
  layout = pipeline.GraphLayout(64, 4, 16, pad_id=0)
  layout.fit_buckets([layout.rows_needed(enc, indices)], 1)
  whole = layout.collate(enc, indices, np.ones(16))
  rows = slice(2, 4)  # Process 1 of 2.
  for a, b in zip(jax.tree.leaves(layout.collate(enc, indices, np.ones(16), rows)), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b[rows])


def test_ranked_file_trains_as_trees_and_evaluates(tmp_path):
  """A ranked JSONL (ties included) through the whole job as trees with the PL loss, then jaxreward-evaluate."""
  path = tmp_path / "ranked.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in itertools.islice(synthetic.ranked_rows(4, 0), 80)))
  config = load_config("tiny")
  config.mesh.data = 1
  config.data.train_path, config.data.group_by_prompt, config.train.loss = str(path), True, "plackett_luce"
  config.train.num_steps, config.train.eval_every = 6, 6
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["tie_pairs_skipped"] > 0 and np.isfinite(summary["val_loss"])
  assert 0 < summary["padding_fraction"] < 1
  result = evaluate.evaluate_file(str(tmp_path / "run"), str(path))
  assert result["meta"]["pairs_scored"] == summary["train_pairs"] + summary["val_pairs"]
