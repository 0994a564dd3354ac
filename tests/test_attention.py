"""Attention kernels: every implementation equals the dense XLA reference, outputs and gradients."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreward import attention, model as model_lib
from tests.conftest import ROOT

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
# fp32 equality needs full-precision dots: JAX's GPU default for float32 matmuls is TF32.
TOL = 1e-5


def random_segments(rng, rows: int, length: int, packed: bool):
  """Packed rows: 1..m runs of random lengths then padding 0 (as packing.py lays them out); None unpacked."""
  if not packed:
    return None
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos, sid = 0, 1
    while pos < length - length // 8:
      n = int(rng.integers(1, length // 2))
      seg[r, pos:pos + n] = sid
      pos, sid = pos + n, sid + 1
  return jnp.asarray(seg)


def random_shared_prompts(rng, rows: int, length: int, packed: bool):
  """Shared-prompt rows (segments, branches): each group is a prompt (branch 0) then 1-3 responses (branches
  1, 2, ...), the first row's first group with three; packed rows hold groups until the last eighth, unpacked
  rows one group (segments None). The rest of the row is padding: segment 0, branch 0."""
  seg = np.zeros((rows, length), np.int32)
  br = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos, sid = 0, 1
    while pos < length - length // 8 and (packed or sid == 1):
      n = int(rng.integers(2, length // 6))
      seg[r, pos:pos + n] = sid
      pos += n
      for branch in range(1, (3 if r == sid == 1 else int(rng.integers(1, 4))) + 1):
        n = int(rng.integers(1, length // 6))
        seg[r, pos:pos + n], br[r, pos:pos + n] = sid, branch
        pos += n
      sid += 1
  return (jnp.asarray(seg[:, :length]) if packed else None), jnp.asarray(br[:, :length])


def qkv(rng, rows, length, heads, kv_heads, head_dim, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.normal(size=(rows, length, n, head_dim)) * 0.5, dtype)
               for n in (heads, kv_heads, kv_heads))


def value_and_grads(fn, q, k, v, segments, branches=None):
  # A random projection of the output as the loss, so every output element contributes a distinct gradient.
  w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  call = (lambda q, k, v: fn(q, k, v, segments)) if branches is None else (lambda q, k, v: fn(q, k, v, segments,
                                                                                                 branches))
  loss = lambda q, k, v: jnp.sum(call(q, k, v).astype(jnp.float32) * w)
  return jax.jit(call)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def reference(q, k, v, segments, branches=None):
  return attention.attend(q, k, v, segments, "xla", branches)


def assert_equal_to_reference(fn, q, k, v, segments, tol=TOL, branches=None):
  out, grads = value_and_grads(fn, q, k, v, segments, branches)
  want_out, want_grads = value_and_grads(reference, q, k, v, segments, branches)
  np.testing.assert_allclose(out, want_out, atol=tol, rtol=tol)
  for name, got, want in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("length,block,packed", [(64, 16, False), (100, 32, True), (48, 256, True)])
def test_blockwise_equals_reference(length, block, packed):
  """Several blocks (with segment-skipping), a ragged last block (100 = 3·32 + 4), and a single block."""
  rng = np.random.default_rng(length)
  q, k, v = qkv(rng, 3, length, 4, 2, 8)
  segments = random_segments(rng, 3, length, packed)
  fn = lambda q, k, v, s: attention.blockwise_attention(q, k, v, s, block=block)
  assert_equal_to_reference(fn, q, k, v, segments)


def test_blockwise_with_branches_equals_reference():
  """Shared-prompt rows over several blocks (some holding only a sibling's tokens, skipped), ragged last block.
  (Unpacked shared-prompt rows are the one-segment case of these.)"""
  rng = np.random.default_rng(101)
  q, k, v = qkv(rng, 2, 100, 4, 2, 8)
  segments, branches = random_shared_prompts(rng, 2, 100, True)
  fn = lambda q, k, v, s, b: attention.blockwise_attention(q, k, v, s, block=16, branches_BxL=b)
  assert_equal_to_reference(fn, q, k, v, segments, branches=branches)


@pytest.mark.skipif(ON_GPU, reason="the TPU kernel's interpret-mode numerics are checked on CPU")
def test_splash_with_branches_equals_reference_in_interpret_mode():
  """Two kernel calls merged by log-sum-exp, and their backward passes from the merged residuals; 150 tokens
  pad to two 128-token blocks, and prompt rows have no key in the second call."""
  rng = np.random.default_rng(11)
  q, k, v = qkv(rng, 2, 150, 4, 2, 16)
  segments, branches = random_shared_prompts(rng, 2, 150, True)
  fn = lambda q, k, v, s, b: attention.attend(q, k, v, s, "splash", b)
  assert_equal_to_reference(fn, q, k, v, segments, branches=branches)


def test_shared_prompt_response_equals_prompt_and_response_alone():
  """The reference's mask (which every kernel is held to): in a row [prompt, response 1, response 2, response 3,
  padding] each response's outputs equal those of the row [prompt, that response] computed alone (causal only),
  and the prompt's are the prompt's alone; the same row without branches differs (so the check can fail)."""
  rng = np.random.default_rng(12)
  spans = [(0, 9, 0), (9, 16, 1), (16, 20, 2), (20, 29, 3)]
  q, k, v = qkv(rng, 1, 32, 4, 2, 8)
  branches = np.zeros((1, 32), np.int32)
  for start, end, branch in spans:
    branches[0, start:end] = branch
  shared = attention.attend(q, k, v, None, "xla", jnp.asarray(branches))
  for start, end, branch in spans:
    alone_rows = np.r_[0:9, start:end] if branch else np.r_[0:9]
    take = lambda x: x[:, alone_rows]
    alone = attention.attend(take(q), take(k), take(v), None, "xla")
    np.testing.assert_allclose(shared[:, start:end], alone[:, -(end - start):], atol=TOL, rtol=TOL)
  plain = attention.attend(q, k, v, None, "xla")
  assert float(jnp.max(jnp.abs(plain[:, 16:29] - shared[:, 16:29]))) > 1e-2


@pytest.mark.skipif(ON_GPU, reason="the TPU kernel's interpret-mode numerics are checked on CPU")
@pytest.mark.parametrize("packed", [False, True])
def test_splash_equals_reference_in_interpret_mode(packed):
  """Pallas interpret mode on CPU: the TPU kernel's numerics; 150 tokens pad up to two 128-token blocks."""
  rng = np.random.default_rng(3)
  q, k, v = qkv(rng, 2, 150, 4, 2, 16)
  segments = random_segments(rng, 2, 150, packed)
  fn = lambda q, k, v, s: attention.attend(q, k, v, s, "splash")
  assert_equal_to_reference(fn, q, k, v, segments)


@pytest.mark.skipif(jax.default_backend() != "cpu" or len(jax.devices()) < 4, reason="runs on 4 fake CPU devices")
@pytest.mark.parametrize("shared_prompts", [False, True])
def test_splash_in_shard_map_equals_reference(shared_prompts):
  """Batch and heads split over a (data=2, tensor=2) mesh: each device runs the kernel on its own shard."""
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  rng = np.random.default_rng(4)
  q, k, v = qkv(rng, 2, 128, 4, 2, 8)
  if shared_prompts:
    segments, branches = random_shared_prompts(rng, 2, 128, True)
  else:
    segments, branches = random_segments(rng, 2, 128, True), None
  on_mesh = lambda x: x if x is None else jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  fn = lambda q, k, v, s, b=None: attention.attend(q, k, v, s, "splash", b)
  out, grads = value_and_grads(fn, *(on_mesh(x) for x in (q, k, v, segments, branches)))
  want_out, want_grads = value_and_grads(reference, q, k, v, segments, branches)
  np.testing.assert_allclose(out, want_out, atol=TOL, rtol=TOL)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_blockwise_skips_blocks_no_query_sees():
  """Row 0 holds four 16-token segments: query block i needs only key block i, so the number of visited key
  blocks is the block count; the second row in the same batch widens the range to its own segments."""
  seg = np.repeat(np.arange(1, 5, dtype=np.int32), 16)[None]
  first = attention._first_visible_block(jnp.asarray(seg).reshape(1, 4, 16))
  np.testing.assert_array_equal(first, [0, 1, 2, 3])
  two_rows = np.concatenate([seg, np.ones_like(seg)])
  first = attention._first_visible_block(jnp.asarray(two_rows).reshape(2, 4, 16))
  np.testing.assert_array_equal(first, [0, 0, 0, 0])
  # A segment id reused after a gap is still found at its first position (no contiguity assumed).
  gap = np.concatenate([np.full(16, 1), np.full(32, 2), np.full(16, 1)]).astype(np.int32)[None]
  np.testing.assert_array_equal(attention._first_visible_block(jnp.asarray(gap).reshape(1, 4, 16)), [0, 1, 1, 0])


def test_xla_branches_without_segments_is_the_branch_rule():
  """The dense mask of an unpacked shared-prompt row: branch rule and causality only (no segment term)."""
  rng = np.random.default_rng(13)
  q, k, v = qkv(rng, 1, 6, 2, 1, 4)
  branches = jnp.asarray([[0, 0, 1, 1, 2, 2]], jnp.int32)
  mask = np.tril(np.ones((6, 6), bool))
  mask[4:, 2:4] = False  # branch 2 never sees branch 1
  want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])
  np.testing.assert_allclose(attention.attend(q, k, v, None, "xla", branches), want, atol=TOL, rtol=TOL)


def test_blockwise_bfloat16_stays_close():
  rng = np.random.default_rng(5)
  q, k, v = qkv(rng, 2, 64, 4, 2, 16, jnp.bfloat16)
  segments = random_segments(rng, 2, 64, True)
  got = attention.blockwise_attention(q, k, v, segments, block=16).astype(jnp.float32)
  want = reference(*(x.astype(jnp.float32) for x in (q, k, v)), segments)
  np.testing.assert_allclose(got, want, atol=3e-2)


def test_auto_resolves_per_platform():
  assert attention.resolve("auto", jnp.bfloat16, platform="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.bfloat16, platform="gpu", branches=True) == "xla"
  assert attention.resolve("auto", jnp.float32, platform="gpu") == "xla"
  assert attention.resolve("auto", jnp.float32, platform="tpu") == "splash"
  assert attention.resolve("auto", jnp.float32, platform="cpu") == "blockwise"
  assert attention.resolve("xla", jnp.float32, platform="tpu") == "xla"
  with pytest.raises(ValueError, match="expected one of"):
    attention.resolve("flash", jnp.float32)


def bf16_errors(implementation, q, k, v, segments, branches=None):
  """Largest absolute error of a bf16 kernel's output and q/k/v gradients against the fp32 reference."""
  fn = lambda q, k, v, s, b=None: attention.attend(q, k, v, s, implementation, b)
  out, grads = value_and_grads(fn, q, k, v, segments, branches)
  with jax.default_matmul_precision("highest"):
    want_out, want_grads = value_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)), segments,
                                           branches)
  return [float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
          for got, want in zip((out, *grads), (want_out, *want_grads))]


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("layout", ["unpacked", "packed", "shared_prompts", "packed_shared_prompts"])
def test_cudnn_equals_reference_on_gpu(layout):
  """cuDNN in bf16 against the fp32 reference: no further off (output, dq, dk, dv) than XLA's own bf16 path is,
  within 2x + 1e-3, and within bf16's resolution at these magnitudes (2e-2 output, 1e-1 gradients of up to ~10;
  XLA's own bf16 dv is off by up to 0.045 here)."""
  rng = np.random.default_rng(6)
  q, k, v = qkv(rng, 2, 256, 8, 2, 64, jnp.bfloat16)
  if layout.endswith("shared_prompts"):
    segments, branches = random_shared_prompts(rng, 2, 256, packed=layout.startswith("packed"))
  else:
    segments, branches = random_segments(rng, 2, 256, packed=layout == "packed"), None
  got = bf16_errors("cudnn", q, k, v, segments, branches)
  xla = bf16_errors("xla", q, k, v, segments, branches)
  print(f"{layout}: max |error| out, dq, dk, dv: cudnn {np.round(got, 5)}, xla bf16 {np.round(xla, 5)}")
  for name, g, x, bound in zip(("out", "dq", "dk", "dv"), got, xla, (2e-2, 1e-1, 1e-1, 1e-1)):
    assert g <= 2 * x + 1e-3 and g <= bound, f"{layout} {name}: cudnn error {g:.3g} vs xla bf16 {x:.3g}"


@pytest.mark.skipif(not (ON_GPU or ON_TPU), reason="the fused kernels of 'auto' need a GPU or TPU")
@pytest.mark.parametrize("packed", [False, True])
def test_auto_on_accelerator_equals_reference(packed):
  """auto runs the fused kernel (its custom call is in the lowered program) on packed and unpacked rows."""
  rng = np.random.default_rng(7)
  q, k, v = qkv(rng, 2, 256, 8, 2, 64, jnp.bfloat16)
  segments = random_segments(rng, 2, 256, packed)
  fn = lambda q, k, v, s: attention.attend(q, k, v, s, "auto")
  assert ("cudnn" if ON_GPU else "tpu_custom_call") in jax.jit(fn).lower(q, k, v, segments).as_text()
  out, _ = value_and_grads(fn, q, k, v, segments)
  with jax.default_matmul_precision("highest"):
    want = reference(*(x.astype(jnp.float32) for x in (q, k, v)), segments)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU memory check")
def test_long_packed_rows_hold_no_length_squared_buffer():
  """tools/long_context.py on tiny dims: the default attention's compiled train step has no buffer with two
  dimensions >= L and trains; the dense reference at the same shape does have them (so the scan can fail)."""
  tiny = ["--length", "512", "--hidden_size", "32", "--num_layers", "2", "--num_heads", "2", "--num_kv_heads", "1",
          "--mlp_dim", "64", "--vocab_size", "512", "--steps", "2"]
  runs = {}
  for name, extra in (("auto", []), ("xla", ["--compile_only"])):
    out = subprocess.run([sys.executable, "tools/long_context.py", *tiny, "--attention", name, *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
  assert runs["auto"]["LxL_buffers"] == [] and runs["xla"]["LxL_buffers"]
  assert runs["auto"]["temp_MiB"] < runs["xla"]["temp_MiB"]
  assert all(np.isfinite(runs["auto"]["losses"])) and runs["auto"]["losses"][1] < runs["auto"]["losses"][0]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tiny CPU run of the GPU benchmark")
def test_train_bench_runs_on_a_tiny_shape():
  """tools/train_bench.py (the GPU check's benchmark) end to end on CPU: every variant reports a step time and
  MFU; the packed batch has fewer real tokens than slots, the unpacked one none missing; the analytic FLOPs
  of the dense-attention step stay within XLA's own count (which also counts the masked half of L x L)."""
  args = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1", "--vocab_size", "256",
          "--length", "64", "--pairs", "2", "--dtype", "float32", "--packed_median", "12", "--steps", "1",
          "--warmup", "1", "--variants", "U-xla,P-blockwise"]
  out = subprocess.run([sys.executable, "tools/train_bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  unpacked, packed = result["variants"]
  assert "error" not in unpacked and "error" not in packed, out.stdout[-2000:]
  assert unpacked["real_tokens"] == unpacked["slot_tokens"] and packed["real_tokens"] < packed["slot_tokens"]
  assert all(r["MFU"] > 0 and r["step_ms"] > 0 and np.isfinite(r["loss_per_pair"]) for r in (unpacked, packed))
  assert 0.5 * unpacked["xla_TFLOP_per_step"] < unpacked["model_TFLOP_per_step"] <= unpacked["xla_TFLOP_per_step"]


def test_backbone_with_blockwise_attention_equals_xla_on_packed_rows():
  """The model's default CPU path over several 64-token blocks: hidden states and parameter gradients equal
  the dense reference's on packed rows (segments with positions restarting per sequence)."""
  rng = np.random.default_rng(8)
  segments = np.asarray(random_segments(rng, 2, 200, True))
  positions = np.zeros_like(segments)
  for r in range(2):
    for s in np.unique(segments[r]):
      where = np.flatnonzero(segments[r] == s)
      positions[r, where] = np.arange(len(where))
  tokens = jnp.asarray(rng.integers(2, 97, size=(2, 200)), jnp.int32)
  hidden, grads = {}, {}
  for name in ("blockwise", "xla"):
    cfg = model_lib.ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=8, mlp_dim=48, attention=name)
    with nnx.use_eager_sharding(False):
      graphdef, params = nnx.split(model_lib.Backbone(cfg, nnx.Rngs(0)), nnx.Param)
    run = lambda p: nnx.merge(graphdef, p)(tokens, jnp.asarray(positions), jnp.asarray(segments))
    hidden[name] = jax.jit(run)(params)
    grads[name] = jax.jit(jax.grad(lambda p: jnp.sum(run(p) ** 2)))(params)
  np.testing.assert_allclose(hidden["blockwise"], hidden["xla"], atol=TOL, rtol=TOL)
  # Through two layers and a squared loss the gradients reach ~10: within 1e-5 of the largest of them.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["xla"]))
  for got, want in zip(jax.tree.leaves(grads["blockwise"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(got, want, atol=TOL * scale, rtol=0)
