"""Llama-family decoder with a scalar reward head, in Flax NNX.

The architecture follows Hugging Face's `LlamaModel` exactly (RMSNorm, rotate-half RoPE, SwiGLU,
grouped-query attention, optional q/k/v bias as in Qwen2), so weights map one-to-one in `hf.py` and
an exported `LlamaForSequenceClassification` scores the same token we do.

Every parameter carries logical axis names; `sharding.py` maps them onto the mesh with the rules table
from the config. Letters in names: B batch, P pair (chosen, rejected), L length, D model width,
N query heads, K key/value heads, H head width, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxreward import attention, configuration

# Logical axis names; `configs/*.py` map them to mesh axes.
VOCAB, EMBED, HEADS, KV_HEADS, MLP, NORM, SCORE = "vocab", "embed", "heads", "kv_heads", "mlp", "norm", "score"
# The leading axis of stacked block parameters (model.scan_layers); every config maps it to None (replicated).
LAYERS = "layers"

# model.remat (configuration.REMAT_POLICIES): what each block's backward pass recomputes instead of keeping.
#   none          keep everything (the fastest; activation memory grows with depth).
#   save_matmuls  keep the attention projections' outputs (q, k, v and o: head- or D-wide, cheap to store), recompute
#                 the norms, RoPE, attention and the F-wide MLP (its gate/up products are the widest activations).
#                 The MLP's down projection is not named: only the residual sum reads it, so no backward needs it.
#   full          keep only each block's input; recompute the whole block.
SAVED_MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture; mirrors the keys of an HF `LlamaConfig`."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # Sorted (key, value) pairs of HF's rope_scaling dict; () for none.
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  dtype: str = "float32"  # Compute dtype; parameters stay in param_dtype.
  param_dtype: str = "float32"
  remat: str = "none"  # One of REMAT_POLICIES.
  scan_layers: bool = False  # Blocks stacked on a leading LAYERS axis and applied in one nnx.scan.
  attention: str = "auto"  # One of attention.IMPLEMENTATIONS; auto picks the platform's fused kernel.
  init_std: float = 0.02

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
    """Builds from the `model` section of a run config."""
    head_dim = model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads
    scaling = model_cfg.get("rope_scaling") or {}
    return cls(
        vocab_size=vocab_size, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads, head_dim=head_dim,
        mlp_dim=model_cfg.mlp_dim, rope_theta=float(model_cfg.rope_theta),
        rope_scaling=tuple(sorted(dict(scaling).items())), norm_eps=float(model_cfg.norm_eps),
        qkv_bias=model_cfg.qkv_bias, tie_embeddings=model_cfg.tie_embeddings, dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype, remat=configuration.remat_policy(model_cfg.remat),
        scan_layers=model_cfg.scan_layers, attention=model_cfg.attention)

  def num_parameters(self) -> int:
    d, n, k, h, f, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.mlp_dim, self.vocab_size)
    attn = d * n * h * 2 + d * k * h * 2 + ((n + 2 * k) * h if self.qkv_bias else 0)
    block = attn + 3 * d * f + 2 * d
    embeddings = v * d * (1 if self.tie_embeddings else 2)
    # The untied LM head is kept so that imported SFT checkpoints round-trip; it is unused for scoring.
    return embeddings + self.num_layers * block + d + d


def remat_policy(name: str):
  """The jax.checkpoint policy of a model.remat name other than 'none'."""
  if name == "save_matmuls":
    return jax.checkpoint_policies.save_only_these_names(*SAVED_MATMULS)
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  raise ValueError(f"model.remat={name!r}; expected one of {', '.join(configuration.REMAT_POLICIES)}")


def _param(rngs, shape, axes, std, dtype):
  init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
  return nnx.Param(init(rngs.params(), shape, dtype))


def _zeros(shape, axes, dtype):
  return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), axes)(None, shape, dtype))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), (NORM,))(None, (dim,), param_dtype))

  def __call__(self, x_BxLxD):
    # Normalise in float32 as HF does, then cast back.
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x).astype(x_BxLxD.dtype)


def project(x_BxLxD, w_DxE):
  """`x @ w` over the last axis as one 2-D matmul [B·L, D] x [D, E]. Written as an einsum over separate batch
  and length axes, XLA:CPU transposes every activation gradient in full before its weight-gradient dot (the
  contraction then spans two axes): twice the CPU time of the MLP's forward and backward pass at
  [64, 256, 128] x [128, 384] (README "CPU profile"). Folding the axes costs nothing elsewhere."""
  return jnp.dot(x_BxLxD.reshape(-1, x_BxLxD.shape[-1]), w_DxE).reshape(*x_BxLxD.shape[:-1], w_DxE.shape[-1])


def rope_frequencies(cfg: ModelConfig):
  """Inverse frequencies of rotate-half RoPE, with HF's 'llama3' and 'linear' scaling."""
  inv_freq_H2 = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  scaling = dict(cfg.rope_scaling)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "linear":
    inv_freq_H2 = inv_freq_H2 / scaling["factor"]
  elif kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq_H2
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_H2 / factor + smooth * inv_freq_H2
    inv_freq_H2 = jnp.where(wavelen > old_len / low, inv_freq_H2 / factor,
                            jnp.where(wavelen < old_len / high, inv_freq_H2, smoothed))
  elif kind != "default":
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
  return inv_freq_H2


def apply_rope(x_BxLxNxH, positions_BxL, inv_freq_H2):
  """`positions_BxL` may have a leading 1 (every row counts from 0) or per-row positions (packed rows)."""
  angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_H2
  angles_BxLxH = jnp.concatenate([angles_BxLxH2, angles_BxLxH2], axis=-1)
  cos, sin = jnp.cos(angles_BxLxH)[:, :, None, :], jnp.sin(angles_BxLxH)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd, std = cfg.param_dtype, cfg.init_std
    self.cfg = cfg
    self.q_DxNH = _param(rngs, (d, n * h), (EMBED, HEADS), std, pd)
    self.k_DxKH = _param(rngs, (d, k * h), (EMBED, KV_HEADS), std, pd)
    self.v_DxKH = _param(rngs, (d, k * h), (EMBED, KV_HEADS), std, pd)
    self.o_NHxD = _param(rngs, (n * h, d), (HEADS, EMBED), std / math.sqrt(2 * cfg.num_layers), pd)
    if cfg.qkv_bias:
      self.q_bias_NH = _zeros((n * h,), (HEADS,), pd)
      self.k_bias_KH = _zeros((k * h,), (KV_HEADS,), pd)
      self.v_bias_KH = _zeros((k * h,), (KV_HEADS,), pd)

  def __call__(self, x_BxLxD, positions_BxL, inv_freq_H2, segments_BxL=None, branches_BxL=None, reads_GxQ=None):
    """[B, L, D]; with `reads_GxQ` only the read positions go through the output projection: [G, Q, D]."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, l, _ = x_BxLxD.shape
    q_BxLxNH = checkpoint_name(project(x_BxLxD, self.q_DxNH[...].astype(dt)), "q_proj")
    k_BxLxKH = checkpoint_name(project(x_BxLxD, self.k_DxKH[...].astype(dt)), "k_proj")
    v_BxLxKH = checkpoint_name(project(x_BxLxD, self.v_DxKH[...].astype(dt)), "v_proj")
    if cfg.qkv_bias:
      q_BxLxNH += self.q_bias_NH[...].astype(dt)
      k_BxLxKH += self.k_bias_KH[...].astype(dt)
      v_BxLxKH += self.v_bias_KH[...].astype(dt)
    q_BxLxNxH = apply_rope(q_BxLxNH.reshape(b, l, cfg.num_heads, cfg.head_dim), positions_BxL, inv_freq_H2)
    k_BxLxKxH = apply_rope(k_BxLxKH.reshape(b, l, cfg.num_kv_heads, cfg.head_dim), positions_BxL, inv_freq_H2)
    v_BxLxKxH = v_BxLxKH.reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    # Sequences are right-padded and the reward is read at the last real token, so the causal rule alone
    # keeps padding out of every position that matters; packed rows add the segment rule (attention.py).
    out_BxLxNxH = attention.attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segments_BxL, cfg.attention,
                                     branches_BxL)
    out_BxLxNH = out_BxLxNxH.reshape(b, l, -1)
    if reads_GxQ is not None:
      out_BxLxNH = gather_reads(out_BxLxNH, reads_GxQ)
    return checkpoint_name(project(out_BxLxNH, self.o_NHxD[...].astype(dt)), "o_proj")


class FeedForward(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd, std = cfg.hidden_size, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
    self.dtype = jnp.dtype(cfg.dtype)
    self.gate_DxF = _param(rngs, (d, f), (EMBED, MLP), std, pd)
    self.up_DxF = _param(rngs, (d, f), (EMBED, MLP), std, pd)
    self.down_FxD = _param(rngs, (f, d), (MLP, EMBED), std / math.sqrt(2 * cfg.num_layers), pd)

  def __call__(self, x_BxLxD):
    dt = self.dtype
    gate_BxLxF = project(x_BxLxD, self.gate_DxF[...].astype(dt))
    up_BxLxF = project(x_BxLxD, self.up_DxF[...].astype(dt))
    return project(swiglu(gate_BxLxF, up_BxLxF), self.down_FxD[...].astype(dt))


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) · up. Differentiated by JAX, the backward pass keeps sigmoid(gate) beside gate and up (one more
  F-wide activation per token and layer); this backward recomputes the sigmoid, element-wise work that fuses
  into its loop. Compiled train step at SmolLM2-135M's dimensions, 4 layers, 16 x 256 tokens: temp memory
  811 -> 739 MiB (~25 MB per layer; 0.7 GB at 30 layers)."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
  gate, up = residuals
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d_out.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  return (d * u * sig * (1.0 + g * (1.0 - sig))).astype(gate.dtype), (d * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.param_dtype)
    self.mlp = FeedForward(cfg, rngs)

  def __call__(self, h_BxLxD, positions_BxL, inv_freq_H2, segments_BxL=None, branches_BxL=None, reads_GxQ=None):
    """[B, L, D] -> [B, L, D]; with `reads_GxQ` (Backbone's last block) -> [G, Q, D] at the read positions."""
    attended = self.attn(self.attn_norm(h_BxLxD), positions_BxL, inv_freq_H2, segments_BxL, branches_BxL, reads_GxQ)
    if reads_GxQ is not None:
      h_BxLxD = gather_reads(h_BxLxD, reads_GxQ)
    h_BxLxD = h_BxLxD + attended
    return h_BxLxD + self.mlp(self.mlp_norm(h_BxLxD))


def gather_reads(x_BxLxE, reads_GxQ):
  """[G, Q, E]: rows b = g·R + r of `x_BxLxE` hold group g's R rows; `reads_GxQ` are flat indices r·L + l."""
  g, q = reads_GxQ.shape
  x_GxRLxE = x_BxLxE.reshape(g, -1, x_BxLxE.shape[-1])
  return jnp.take_along_axis(x_GxRLxE, reads_GxQ[:, :, None], axis=1)


class Backbone(nnx.Module):
  """The decoder without any output head: tokens -> final-normed hidden states."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = _param(rngs, (cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), cfg.init_std, cfg.param_dtype)
    if cfg.scan_layers:
      # One Block whose every parameter has a leading [num_layers] axis, each layer from its own key.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def stacked(layer_rngs):
        return Block(cfg, layer_rngs)

      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.param_dtype)

  def __call__(self, tokens_BxL, positions_BxL=None, segments_BxL=None, branches_BxL=None, reads_GxQ=None):
    """One sequence per row by default; packed rows pass each token's position in, and segment id of, its
    own sequence (segment 0 is padding); shared-prompt rows also pass each token's branch (attention.attend).

    Returns the final-normed hidden states [B, L, D], or with `reads_GxQ` (rows b = g·R + r in groups of R,
    flat indices r·L + l) only those positions' [G, Q, D]. A reward model reads one position per sequence,
    and after the last block's attention no position affects another: that block's output projection, MLP
    and the final norm then run on the Q read positions alone instead of all B·L (a 1/num_layers share of
    the MLP and output-projection FLOPs: a quarter of them for configs/small.py's 4 layers).
    """
    dt = jnp.dtype(self.cfg.dtype)
    h_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0).astype(dt)
    if positions_BxL is None:
      positions_BxL = jnp.arange(tokens_BxL.shape[1])[None]
    inv_freq_H2 = rope_frequencies(self.cfg)

    def apply(h_BxLxD, block):
      return block(h_BxLxD, positions_BxL, inv_freq_H2, segments_BxL, branches_BxL)

    def apply_last(h_BxLxD, block):
      return block(h_BxLxD, positions_BxL, inv_freq_H2, segments_BxL, branches_BxL, reads_GxQ)

    if self.cfg.remat != "none":
      apply = nnx.remat(apply, policy=remat_policy(self.cfg.remat))
      apply_last = nnx.remat(apply_last, policy=remat_policy(self.cfg.remat))
    if self.cfg.scan_layers:
      blocks, last = self.blocks, None
      if reads_GxQ is not None:
        blocks, last = _split_last(self.blocks, self.cfg.num_layers)
      if blocks is not None:
        # One traced block for all layers: compile time no longer grows with depth.
        h_BxLxD = nnx.scan(apply, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                           transform_metadata={nnx.PARTITION_NAME: LAYERS})(h_BxLxD, blocks)
    else:
      blocks = list(self.blocks)
      last = blocks.pop() if reads_GxQ is not None else None
      for block in blocks:
        h_BxLxD = apply(h_BxLxD, block)
    if last is not None:
      h_BxLxD = apply_last(h_BxLxD, last)
    return self.final_norm(h_BxLxD)


def _split_last(stacked: Block, num_layers: int):
  """(the first num_layers - 1 layers of a stacked Block, or None for one layer; the last layer as a Block)."""
  graphdef, state = nnx.split(stacked)
  last = nnx.merge(graphdef, jax.tree.map(lambda x: x[-1], state))
  if num_layers == 1:
    return None, last
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[:-1], state)), last


class RewardModel(nnx.Module):
  """Backbone + linear scalar head read at each sequence's last real token (HF's `score`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs)
    if not cfg.tie_embeddings:
      # Kept only so an SFT checkpoint's LM head survives import/export; scoring never reads it.
      self.lm_head_DxV = _param(rngs, (cfg.hidden_size, cfg.vocab_size), (EMBED, VOCAB), cfg.init_std, cfg.param_dtype)
    self.score_Dx1 = _param(rngs, (cfg.hidden_size, 1), (EMBED, SCORE), 1.0 / math.sqrt(cfg.hidden_size + 1),
                            cfg.param_dtype)

  def head(self, h_BxD):
    return jnp.einsum("bd,do->bo", h_BxD.astype(jnp.float32), self.score_Dx1[...].astype(jnp.float32))[:, 0]

  def score(self, tokens_GxRxL, ends_GxBxP, positions_GxRxL=None, segments_GxRxL=None, branches_GxRxL=None):
    """Rewards of the pairs of a batch (pipeline.Batch's layout), float32 [G, B, P].

    Group g's R rows hold the sequences of its B pairs; `ends_GxBxP` is each side's EOS as a flat index r·L + l
    into its group's rows. Packed rows pass each token's position in, and segment id of, its own sequence;
    without them every row is one sequence starting at position 0. Shared-prompt rows (graphs.py) also pass
    each token's branch: 0 for a prompt, k for the tokens of its k-th response. Groups are the sharded axis, so every gather
    stays on the device that holds the group; groups x rows fold into the batch around the backbone.
    """
    g, r, l = tokens_GxRxL.shape
    _, b, p = ends_GxBxP.shape
    fold = lambda x: None if x is None else x.reshape(g * r, l)
    h_GxBPxD = self.backbone(fold(tokens_GxRxL), fold(positions_GxRxL), fold(segments_GxRxL), fold(branches_GxRxL),
                             reads_GxQ=ends_GxBxP.reshape(g, b * p))
    return self.head(h_GxBPxD.reshape(g * b * p, -1)).reshape(g, b, p)

  def __call__(self, tokens_BxL, lengths_B):
    """Reward per right-padded sequence, float32 [B]: `score` with one sequence per group."""
    last_Bx1x1 = jnp.maximum(jnp.asarray(lengths_B) - 1, 0)[:, None, None]
    return self.score(jnp.asarray(tokens_BxL)[:, None], last_Bx1x1)[:, 0, 0]
