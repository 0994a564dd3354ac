"""Causal self-attention with grouped-query heads and per-token segment ids, one entry point for every kernel.

`attend(q, k, v, segments, implementation, branches)` is what the model calls. Rows are either unpacked (one
sequence per row, right-padded: `segments_BxL=None`, the causal rule alone keeps padding out of every real token)
or packed (several sequences per row: a token sees only earlier tokens of its own segment; padding is segment 0
and sees only padding, so no softmax row is empty). Shared-prompt rows add `branches_BxL`: a prompt's tokens are
branch 0 and the tokens of its k-th response branch k, so key j is visible to query i iff j <= i, the segments
are equal, and branches[j] is 0 or branches[i] (a response sees its prompt and itself, never a sibling).
Segment ids and branches are integers in [0, L]. Implementations:

  xla        jax.nn.dot_product_attention with a dense [B, 1, L, L] mask: the reference. Its fp32 logits are
             [B, N, L, L], which is what runs out of memory at long rows.
  cudnn      the same public call with implementation="cudnn" (NVIDIA, bf16); segments and branches go in as the
             dense mask, which cuDNN reads as a [B, 1, L, L] bf16 bias (2 bytes per pair of positions, shared
             by the heads and the layers, instead of the reference's fp32 logits per head).
  splash     Pallas TPU splash attention (SegmentIds + a causal mask) in a shard_map over the batch and head
             axes; on any other backend it runs in Pallas interpret mode (slow: for tests only). Its masks are
             equality of ids, which cannot say "the prompt is seen by every branch": shared-prompt rows take two
             kernel calls (each branch and each prompt with itself; responses against their prompt) merged by
             their log-sum-exps, with one backward pass per call from the merged output and log-sum-exp.
  blockwise  pure-JAX flash attention with its own backward pass: an online softmax over key blocks that
             keeps only [B, N, block, block] logits at a time and never visits a key block that no query of
             the query block can see (later blocks by the causal rule, earlier segments by the segment rule,
             with branches also blocks that hold only siblings' tokens).
  auto       cudnn on NVIDIA GPUs (bf16 rows, packed or not; xla for fp32 and for shared-prompt rows, whose
             cuDNN run is not yet checked on a GPU), splash on TPU, blockwise elsewhere.

Letters: B batch rows, L length, N query heads, K key/value heads, G = N / K query heads per key/value head,
H head width, Q/S query/key positions within a block, C number of blocks.
"""

from __future__ import annotations

import math

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blockwise")

# Key/query blocks of the blockwise path, profiled with tools/attention_profile.py (fp32, forward + backward,
# 2 Zen 2 cores under load, so ±30%): packed rows favour small blocks (finer skipping; 2 x 2,048 tokens, 4 heads
# of 64: 64 -> 0.58 s, 128 -> 1.09 s, 256 -> 1.13 s; 16 x 256 tokens: 64 -> 88 ms, 128 -> 294 ms, dense xla
# 508 ms), as do short unpacked rows (16 x 256: 64 -> 184 ms, 128 -> 360 ms, xla 348 ms); long unpacked rows
# favour 128 (2 x 2,048: 64 -> 1.79 s, 128 -> 1.40 s).
BLOCK, LONG_UNPACKED_BLOCK, LONG_UNPACKED = 64, 128, 1024
# Finite stand-in for -inf: a fully masked block row then gives exp(0)·0 terms instead of NaN.
_NEG = -0.7 * float(np.finfo(np.float32).max)


def resolve(implementation: str, dtype, platform: str | None = None, branches: bool = False) -> str:
  """The concrete kernel that `implementation` means on `platform` (default: JAX's default backend) for rows
  with or without shared-prompt `branches`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda"):
    # cuDNN's fused kernel is bf16/fp16 only. On an H100 it equals the reference on unpacked and packed rows
    # (tools/gpu_check.sh; README "Performance"); shared-prompt rows have not been through that check yet.
    return "cudnn" if jnp.dtype(dtype) == jnp.bfloat16 and not branches else "xla"
  if platform == "tpu":
    return "splash"
  return "blockwise"


def attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL=None, implementation: str = "auto", branches_BxL=None):
  """Causal attention, scaled by 1/sqrt(H); k/v heads are shared by N/K consecutive query heads (as HF's
  repeat_kv). Returns [B, L, N, H] in q's dtype."""
  kind = resolve(implementation, q_BxLxNxH.dtype, branches=branches_BxL is not None)
  if kind in ("xla", "cudnn"):
    mask_Bx1xLxL = None
    if segments_BxL is not None:
      mask_Bx1xLxL = (segments_BxL[:, :, None] == segments_BxL[:, None, :])[:, None]
    if branches_BxL is not None:
      same_BxLxL = branches_BxL[:, :, None] == branches_BxL[:, None, :]
      shared_Bx1xLxL = ((branches_BxL[:, None, :] == 0) | same_BxLxL)[:, None]
      mask_Bx1xLxL = shared_Bx1xLxL if mask_Bx1xLxL is None else mask_Bx1xLxL & shared_Bx1xLxL
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_Bx1xLxL, is_causal=True,
                                        implementation=None if kind == "xla" else "cudnn")
  if kind == "splash":
    return splash_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, branches_BxL)
  return blockwise_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, branches_BxL=branches_BxL)


# ---------------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention in plain JAX
# ---------------------------------------------------------------------------------------------------------------


def blockwise_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL=None, block: int | None = None,
                        branches_BxL=None):
  b, l, n, h = q_BxLxNxH.shape
  if block is None:
    unpacked = segments_BxL is None and branches_BxL is None
    block = LONG_UNPACKED_BLOCK if unpacked and l > LONG_UNPACKED else BLOCK
  kv = k_BxLxKxH.shape[2]
  block = min(block, -(-l // 8) * 8)
  padded = -(-l // block) * block
  # jnp: a host (numpy) array cannot be indexed by the kernel loops' traced block index.
  segments_BxL = jnp.zeros((b, l), jnp.int32) if segments_BxL is None else jnp.asarray(segments_BxL, jnp.int32)
  if branches_BxL is not None:
    branches_BxL = jnp.asarray(branches_BxL, jnp.int32)
  if padded != l:
    # Keys past the end come after every real query, so the causal rule hides them; their queries are dropped.
    pad = ((0, 0), (0, padded - l), (0, 0), (0, 0))
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = (jnp.pad(x, pad) for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH))
    segments_BxL = jnp.pad(segments_BxL, ((0, 0), (0, padded - l)))
    if branches_BxL is not None:
      branches_BxL = jnp.pad(branches_BxL, ((0, 0), (0, padded - l)))
  c = padded // block
  # Heads before positions, once per call: every block product below then has its batch axes (b, k) leading
  # and contracts a trailing axis, which XLA:CPU runs without transposing operands inside the loops (that
  # transposing took more time than the products at 64 x 256 tokens).
  q_BxCxKxGxQxH = q_BxLxNxH.reshape(b, c, block, kv, n // kv, h).transpose(0, 1, 3, 4, 2, 5)
  k_BxCxKxSxH = k_BxLxKxH.reshape(b, c, block, kv, h).transpose(0, 1, 3, 2, 4)
  v_BxCxKxSxH = v_BxLxKxH.reshape(b, c, block, kv, h).transpose(0, 1, 3, 2, 4)
  br_BxCxQ = None if branches_BxL is None else branches_BxL.reshape(b, c, block)
  out_BxCxKxGxQxH = _flash(q_BxCxKxGxQxH, k_BxCxKxSxH, v_BxCxKxSxH, segments_BxL.reshape(b, c, block), br_BxCxQ)
  return out_BxCxKxGxQxH.transpose(0, 1, 4, 2, 3, 5).reshape(b, padded, n, h)[:, :l]


def _first_visible_block(seg_BxCxQ):
  """For each query block, the first key block that some query of it (in any row) can see: the block of the
  earliest first position of its queries' segments. Exact for any ids in [0, L], contiguous or not."""
  b, c, q = seg_BxCxQ.shape
  seg_BxL = jnp.clip(seg_BxCxQ.reshape(b, c * q), 0, c * q)
  positions_L = jnp.arange(c * q, dtype=jnp.int32)
  first_BxI = jax.vmap(lambda s: jnp.full((c * q + 1,), c * q, jnp.int32).at[s].min(positions_L))(seg_BxL)
  start_BxL = jnp.take_along_axis(first_BxI, seg_BxL, axis=1)
  return jnp.min(start_BxL.reshape(b, c, q), axis=(0, 2)) // q  # [C]


def _block_visible(seg, br, i, j):
  """The causal + segment (+ branch) mask [B, 1, 1, Q, S] of query block i against key block j."""
  size = seg.shape[2]
  causal_QxS = (i * size + jnp.arange(size))[:, None] >= (j * size + jnp.arange(size))[None, :]
  visible_BxQxS = causal_QxS[None] & (seg[:, i, :, None] == seg[:, j, None, :])
  if br is not None:
    visible_BxQxS &= (br[:, j, None, :] == 0) | (br[:, i, :, None] == br[:, j, None, :])
  return visible_BxQxS[:, None, None]


# The block products as matmuls with one batch axis X = (b, k) and one row axis M = (g, q) (free reshapes):
# XLA:CPU ran them ~20% slower written with two of each (attention forward + backward at autoj's shape, README).
def _rows_by_keys(x_BxKxGxQxH, y_BxKxSxH):
  """[B, K, G, Q, S] fp32: each (g, q) row of x against each key s of y, contracting H."""
  b, kv, g, q, h = x_BxKxGxQxH.shape
  x_XxMxH, y_XxSxH = x_BxKxGxQxH.reshape(b * kv, g * q, h), y_BxKxSxH.reshape(b * kv, -1, h)
  return jnp.einsum("xmh,xsh->xms", x_XxMxH, y_XxSxH, preferred_element_type=jnp.float32).reshape(b, kv, g, q, -1)


def _rows_from_keys(p_BxKxGxQxS, y_BxKxSxH):
  """[B, K, G, Q, H] fp32: each (g, q) row of p weights the keys' rows of y, contracting S."""
  b, kv, g, q, s = p_BxKxGxQxS.shape
  p_XxMxS, y_XxSxH = p_BxKxGxQxS.reshape(b * kv, g * q, s), y_BxKxSxH.reshape(b * kv, s, -1)
  return jnp.einsum("xms,xsh->xmh", p_XxMxS, y_XxSxH, preferred_element_type=jnp.float32).reshape(b, kv, g, q, -1)


def _keys_from_rows(p_BxKxGxQxS, x_BxKxGxQxH):
  """[B, K, S, H] fp32: for each key s, the (g, q) rows of x weighted by p, contracting G and Q."""
  b, kv, g, q, s = p_BxKxGxQxS.shape
  p_XxMxS, x_XxMxH = p_BxKxGxQxS.reshape(b * kv, g * q, s), x_BxKxGxQxH.reshape(b * kv, g * q, -1)
  return jnp.einsum("xms,xmh->xsh", p_XxMxS, x_XxMxH, preferred_element_type=jnp.float32).reshape(b, kv, s, -1)


def _unless_hidden(br, visible, compute, skipped, operand):
  """compute(operand), or skipped(operand) when branches are given and no query sees any key of the block (in
  no row): the key blocks of sibling responses. Without branches the range of blocks already is exact enough
  and the branch-free program stays as it was."""
  if br is None:
    return compute(operand)
  return jax.lax.cond(jnp.any(visible), compute, skipped, operand)


def _forward(q, k, v, seg, br):
  """Output [B, C, K, G, Q, H] and log-sum-exp [B, C, K, G, Q] of the online softmax."""
  b, c, kv, g, size, h = q.shape
  scale = 1.0 / math.sqrt(h)
  first_C = _first_visible_block(seg)

  def query_block(i, carry):
    out, lse = carry
    q_i = q[:, i]

    def key_block(j, state):
      visible = _block_visible(seg, br, i, j)

      def update(state):
        m, total, acc = state
        s = _rows_by_keys(q_i, k[:, j]) * scale
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, _NEG), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + _rows_from_keys(p.astype(v.dtype), v[:, j])
        return m_new, total * correction + jnp.sum(p, axis=-1), acc

      return _unless_hidden(br, visible, update, lambda state: state, state)

    init = (jnp.full((b, kv, g, size), _NEG, jnp.float32), jnp.zeros((b, kv, g, size), jnp.float32),
            jnp.zeros((b, kv, g, size, h), jnp.float32))
    m, total, acc = jax.lax.fori_loop(first_C[i], i + 1, key_block, init)
    return out.at[:, i].set((acc / total[..., None]).astype(q.dtype)), lse.at[:, i].set(m + jnp.log(total))

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, c, kv, g, size), jnp.float32))
  return jax.lax.fori_loop(0, c, query_block, init)


@jax.custom_vjp
def _flash(q, k, v, seg, br):
  return _forward(q, k, v, seg, br)[0]


def _flash_fwd(q, k, v, seg, br):
  out, lse = _forward(q, k, v, seg, br)
  return out, (q, k, v, seg, br, out, lse)


def _flash_bwd(residuals, d_out):
  """Recomputes each visited block's probabilities from the saved log-sum-exp (as FlashAttention-2 does)."""
  q, k, v, seg, br, out, lse = residuals
  b, c, kv, g, size, h = q.shape
  scale = 1.0 / math.sqrt(h)
  first_C = _first_visible_block(seg)
  # D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term, per query and head.
  delta_BxCxKxGxQ = jnp.einsum("bckgqh,bckgqh->bckgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def query_block(i, carry):
    dq, dk, dv = carry
    q_i, do_i = q[:, i], d_out[:, i]
    lse_i, delta_i = lse[:, i], delta_BxCxKxGxQ[:, i]

    def key_block(j, state):
      dq_i, dk, dv = state
      visible = _block_visible(seg, br, i, j)

      def grads(j):
        s = _rows_by_keys(q_i, k[:, j]) * scale
        p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
        dv_j = _keys_from_rows(p.astype(do_i.dtype), do_i)
        dp = _rows_by_keys(do_i, v[:, j])
        ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
        dq_i = _rows_from_keys(ds, k[:, j])
        dk_j = _keys_from_rows(ds, q_i)
        return dq_i, dk_j, dv_j

      # Only the block-sized terms go through the branch: the whole-row dk/dv stay out of the conditional.
      zeros = lambda j: (jnp.zeros(q_i.shape, jnp.float32), jnp.zeros(k.shape[:1] + k.shape[2:], jnp.float32),
                         jnp.zeros(v.shape[:1] + v.shape[2:], jnp.float32))
      dq_ij, dk_j, dv_j = _unless_hidden(br, visible, grads, zeros, j)
      return dq_i + dq_ij, dk.at[:, j].add(dk_j), dv.at[:, j].add(dv_j)

    dq_i = jnp.zeros(q_i.shape, jnp.float32)
    dq_i, dk, dv = jax.lax.fori_loop(first_C[i], i + 1, key_block, (dq_i, dk, dv))
    return dq.at[:, i].set(dq_i.astype(q.dtype)), dk, dv

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, c, query_block, init)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)
# ---------------------------------------------------------------------------------------------------------------

_SPLASH_BLOCK = 128  # The TPU kernel's lane width: rows are padded to a multiple of it.
_SPLASH_BLOCK_NAMES = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                       "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")


def _mesh_axes(mesh, logical: str, default: tuple, size: int) -> tuple:
  """Mesh axes that the context's logical rule (else `default`) names for `logical`, kept while they divide
  `size`: the shard_map then splits exactly what the model's sharding rules split."""
  rules = dict(flax.core.spmd.get_logical_axis_rules() or ())
  named = rules.get(logical, default)
  named = (named,) if isinstance(named, str) else tuple(named or ())
  axes, shards = [], 1
  for axis in named:
    if axis in mesh.axis_names and size % (shards * mesh.shape[axis]) == 0:
      axes.append(axis)
      shards *= mesh.shape[axis]
  return tuple(axes)


def _splash_kernel(length: int, heads: int, save_residuals: bool = False):
  return splash.make_splash_mha(
      splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads),
      block_sizes=splash.BlockSizes(**{name: _SPLASH_BLOCK for name in _SPLASH_BLOCK_NAMES}),
      head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu", save_residuals=save_residuals)


def _shared_prompt_forward(q_NxLxH, k_KxLxH, v_KxLxH, own_L, asks_L, offers_L):
  """One row's output and log-sum-exp [N, L] over the union of two disjoint key sets: call 1 lets each token see
  its own (segment, branch), call 2 lets response tokens (`asks`) see the prompt tokens (`offers`) of their
  segment. A prompt token asks for nothing in call 2; the kernel then gives that row's log-sum-exp ~ its mask
  value (-0.7 · fp32 max), which weighs it out of the merge."""
  kernel = _splash_kernel(q_NxLxH.shape[1], q_NxLxH.shape[0], save_residuals=True)
  o1, (lse1_NxL,) = kernel(q_NxLxH, k_KxLxH, v_KxLxH, segment_ids=splash.SegmentIds(q=own_L, kv=own_L))
  o2, (lse2_NxL,) = kernel(q_NxLxH, k_KxLxH, v_KxLxH, segment_ids=splash.SegmentIds(q=asks_L, kv=offers_L))
  sees_prompt_NxL = lse2_NxL > 0.5 * _NEG
  lse_NxL = jnp.where(sees_prompt_NxL, jnp.logaddexp(lse1_NxL, lse2_NxL), lse1_NxL)
  w1_NxL = jnp.exp(lse1_NxL - lse_NxL)
  w2_NxL = jnp.where(sees_prompt_NxL, jnp.exp(lse2_NxL - lse_NxL), 0.0)
  out = w1_NxL[..., None] * o1.astype(jnp.float32) + w2_NxL[..., None] * o2.astype(jnp.float32)
  return out.astype(q_NxLxH.dtype), lse_NxL


@jax.custom_vjp
def _splash_shared_prompt(q_NxLxH, k_KxLxH, v_KxLxH, own_L, asks_L, offers_L):
  return _shared_prompt_forward(q_NxLxH, k_KxLxH, v_KxLxH, own_L, asks_L, offers_L)[0]


def _splash_shared_prompt_fwd(q, k, v, own, asks, offers):
  out, lse = _shared_prompt_forward(q, k, v, own, asks, offers)
  return out, (q, k, v, own, asks, offers, out, lse)


def _splash_shared_prompt_bwd(residuals, d_out):
  """The merged softmax's gradient is the sum over the two key sets of the kernel's own backward pass run with
  the merged output and log-sum-exp (its probabilities exp(s - lse) are then the merged ones, and its
  rowsum(dO·O) term the merged one), as ring attention combines its blocks. The kernel's custom VJP saves only
  its own output and log-sum-exp, so the backward function is called directly (splash_attention_kernel's
  `_splash_attention_bwd`, jax 0.10.2)."""
  q, k, v, own, asks, offers, out, lse = residuals
  kernel = _splash_kernel(q.shape[1], q.shape[0])
  kw = kernel.kwargs
  collapse = lambda info: info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(
      -1, *info.partial_mask_blocks.shape[-2:])) if info.partial_mask_blocks is not None else info
  grads = []
  for ids in (splash.SegmentIds(q=own, kv=own), splash.SegmentIds(q=asks, kv=offers)):
    res = (q, k, v, ids, None, out, lse, collapse(kernel.dq_mask_info), collapse(kernel.dkv_mask_info))
    grads.append(splash._splash_attention_bwd(  # pylint: disable=protected-access
        False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
        kw["attn_logits_soft_cap"], kw["interpret"], res, d_out)[3:6])
  (dq1, dk1, dv1), (dq2, dk2, dv2) = grads
  return dq1 + dq2, dk1 + dk2, dv1 + dv2, None, None, None


_splash_shared_prompt.defvjp(_splash_shared_prompt_fwd, _splash_shared_prompt_bwd)


def splash_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL=None, branches_BxL=None):
  b, l, n, h = q_BxLxNxH.shape
  kv = k_BxLxKxH.shape[2]
  padded = -(-l // _SPLASH_BLOCK) * _SPLASH_BLOCK
  pad = ((0, 0), (0, padded - l), (0, 0), (0, 0))
  # Splash takes [heads, L, H] per row and does not scale q.
  q_BxNxLxH = jnp.pad(q_BxLxNxH * jnp.asarray(1.0 / math.sqrt(h), q_BxLxNxH.dtype), pad).transpose(0, 2, 1, 3)
  k_BxKxLxH = jnp.pad(k_BxLxKxH, pad).transpose(0, 2, 1, 3)
  v_BxKxLxH = jnp.pad(v_BxLxKxH, pad).transpose(0, 2, 1, 3)
  # Padded tail keys come after every real query (causal) or sit in segment 0 beside padding only.
  pad_ids = lambda ids_BxL: jnp.pad(jnp.asarray(ids_BxL, jnp.int32), ((0, 0), (0, padded - l)))
  if branches_BxL is None:
    ids = () if segments_BxL is None else (pad_ids(segments_BxL),)
  else:
    if (padded + 1) ** 2 >= 2 ** 31:
      raise ValueError(f"splash attention with branches encodes (segment, branch) in int32: rows of {l} tokens "
                       f"are too long (at most 46,000)")
    seg_BxL = pad_ids(jnp.zeros((b, l), jnp.int32) if segments_BxL is None else segments_BxL)
    br_BxL = pad_ids(branches_BxL)
    # Ids of the two calls (_shared_prompt_forward); -1 and -2 match no segment id and not each other.
    own_BxL = seg_BxL * (padded + 1) + br_BxL
    asks_BxL = jnp.where(br_BxL == 0, -1, seg_BxL)
    offers_BxL = jnp.where(br_BxL == 0, seg_BxL, -2)
    ids = (own_BxL, asks_BxL, offers_BxL)

  def local(q, k, v, *ids):
    if len(ids) == 3:
      return jax.vmap(_splash_shared_prompt)(q, k, v, *ids)
    kernel = _splash_kernel(padded, q.shape[1])
    if not ids:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(q, k, v,
                                                                                                           *ids)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = jax.typeof(q_BxLxNxH).sharding.mesh
  if mesh.empty or mesh.size == 1:
    out_BxNxLxH = local(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, *ids)
  else:
    # A Pallas call is not auto-partitioned: each device runs the kernel on its own rows and heads.
    batch = _mesh_axes(mesh, "batch", ("data", "fsdp"), b) or None
    heads = _mesh_axes(mesh, "heads", ("tensor",), math.gcd(n, kv)) or None
    spec = PartitionSpec(batch, heads)
    out_BxNxLxH = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec) + (PartitionSpec(batch),) * len(ids),
                                out_specs=spec, check_vma=False)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, *ids)
  return out_BxNxLxH.transpose(0, 2, 1, 3)[:, :l]
