"""The memory estimate against the arrays a created state really puts on a device, and known arithmetic."""

import dataclasses
import subprocess
import sys

import jax
import pytest

from jaxreward import memory, model as model_lib, optimizer, presets, sharding, state as state_lib
from tests.conftest import ROOT, load_config

CFG = model_lib.ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                            mlp_dim=96, tie_embeddings=False, attention="xla")


def shard_bytes(tree, min_ndim=0):
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if x.ndim >= min_ndim)


@pytest.mark.parametrize("preset,sizes,scan_layers", [
    ("dp", {}, False), ("fsdp", {}, True), ("fsdp_tp", {"fsdp": 2, "tensor": 4}, False),
    ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, True)])
def test_state_bytes_equal_the_created_state(preset, sizes, scan_layers):
  config = presets.apply(load_config("tiny"), preset, **sizes)
  mesh, rule_table = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  tx, _ = optimizer.make(config.train, 10)
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)  # Stacked blocks: same bytes, a replicated layers axis.
  _, state, _ = state_lib.create_state(cfg, tx, mesh, rule_table, seed=0)
  est = memory.estimate(cfg, dict(mesh.shape), rule_table, batch_size=16, max_length=64)
  assert est["parameters"] == shard_bytes(state["params"])
  # Adam's mu and nu; the step counters are scalars and not counted.
  assert est["adam_state"] == shard_bytes(state["opt_state"], min_ndim=1)
  assert est["info"]["num_parameters"] == CFG.num_parameters()
  if preset == "dp":
    assert est["parameters"] == 4 * CFG.num_parameters()


def test_known_arithmetic():
  rules = sharding.rules(presets.apply(load_config("tiny"), "fsdp_tp").mesh)
  one = memory.estimate(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64)
  # CFG is untied: its LM head (D x V) has parameters but no gradient and no Adam moments.
  trained = CFG.num_parameters() - CFG.hidden_size * CFG.vocab_size
  assert one["parameters"] == 4 * CFG.num_parameters() and one["gradients"] == 4 * trained
  assert one["adam_state"] == 8 * trained and one["gathered_weights"] == 0
  tied = memory.estimate(model_lib.ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}),
                         {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64)
  assert tied["gradients"] == tied["parameters"] == one["gradients"]
  assert memory.estimate(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64,
                         param_dtype="bfloat16")["parameters"] == 2 * CFG.num_parameters()
  # 2 x 2 batch shards: each device sees a quarter of 16 pairs, i.e. 8 sequences.
  four = memory.estimate(CFG, {"data": 2, "fsdp": 2, "tensor": 1}, rules, 16, 64)
  assert four["info"]["local_sequences"] == 8 and one["info"]["local_sequences"] == 32
  assert four["activations"] * 4 == one["activations"]
  assert four["gathered_weights"] > 0  # fsdp > 1 gathers a block at a time, whatever the layout.
  assert memory.estimate(dataclasses.replace(CFG, scan_layers=True), {"data": 2, "fsdp": 2, "tensor": 1}, rules, 16,
                         64) == four
  # Remat keeps one block's internals instead of every block's, save_matmuls also each block's q, k, v and o
  # projections; flash attention drops the L x L scores exactly.
  full, save = (memory.estimate(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64, remat=policy)["activations"]
                for policy in ("full", "save_matmuls"))
  assert full < one["activations"]
  projections = 4 * (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim + 4 * CFG.hidden_size  # fp32 q, k, v, o
  assert save - full == 32 * 64 * CFG.num_layers * projections
  flash = memory.estimate(model_lib.ModelConfig(**{**CFG.__dict__, "attention": "cudnn"}),
                          {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64)
  scores = 32 * 64 * CFG.num_heads * 64 * (4 + 4)  # sequences x L query rows x heads x L keys x (fp32 logits+probs)
  assert one["activations"] - flash["activations"] == scores * (CFG.num_layers + 1)
  accum = memory.estimate(CFG, {"data": 1, "fsdp": 1, "tensor": 1}, rules, 16, 64, grad_accum_steps=4)
  assert accum["info"]["local_sequences"] == 8 and accum["grad_accumulator"] == one["gradients"]


def test_auto_on_a_gpu_counts_the_kernel_it_picks(monkeypatch):
  """On a GPU `auto` is cuDNN (no L x L scores kept) for bf16 rows, but xla for shared-prompt rows
  (data.group_by_prompt): the estimate and its printed kernel follow the pick."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rules = sharding.rules(load_config("tiny").mesh)
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  bf16 = dataclasses.replace(CFG, attention="auto", dtype="bfloat16")
  pairs, trees = (memory.estimate(bf16, mesh, rules, 16, 64, branches=b) for b in (False, True))
  assert (pairs["info"]["attention"], trees["info"]["attention"]) == ("auto = cudnn", "auto = xla")
  scores = 32 * 64 * CFG.num_heads * 64 * (4 + 2)  # fp32 logits + bf16 probabilities per query row
  assert trees["activations"] - pairs["activations"] == scores * (CFG.num_layers + 1)
  config = load_config("tiny")
  config.model.dtype, config.data.group_by_prompt = "bfloat16", True
  assert memory.from_config(config, bf16, mesh)["info"]["attention"] == "auto = xla"


def test_fits():
  est = {"total": 21 * memory.GiB}  # Over 90% of 24 GB (L4), under 90% of 32 GiB (v4).
  names = memory.fits(est)
  assert "NVIDIA H100 80GB" in names and "TPU v5p (95 GiB/chip)" in names and "TPU v4 (32 GiB/chip)" in names
  assert "TPU v5e (16 GiB/chip)" not in names and "NVIDIA L4 24GB" not in names
  assert memory.fits({"total": 200 * memory.GiB}) == []


def test_tool_prints_large():
  out = subprocess.run([sys.executable, "tools/memory.py", "--config", "configs/large.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"XLA_FLAGS": "", "PATH": "/usr/bin:/bin",
                                                                          "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "8.03B parameters on mesh data=1 x fsdp=8 x tensor=4 (32 devices)" in out.stdout
  assert "TPU v5p (95 GiB/chip)" in out.stdout and "v5p-64" in out.stdout
