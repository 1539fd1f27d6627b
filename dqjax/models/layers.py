"""Building blocks shared by the U-Nets, the DiT and the autoencoders, named as diffusers names them.

Parameter paths mirror diffusers' state-dict names with '.' → '_' before an index
('down_blocks.0.resnets.1.conv1.weight' → 'down_blocks_0/resnets_1/conv1/kernel'), so that loading a
diffusers checkpoint is a mechanical rename and transpose (see `dqjax.models.convert`).

Two parameter-free ops are modules only so that quantization rules can target them by path:
`MatMul` (attention QKᵀ as `qk_matmul` and softmax·V as `sv_matmul`) and `Concat` (the U-Net's skip
concatenation, `skip_concat_<j>`). Every projection is an `nn.Dense` or `nn.Conv`, the ops the quantization
core intercepts. Norms compute their variance in two passes (as torch does) so that outputs match diffusers.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TIME_EMBEDDING_NORMS = ("default", "scale_shift")


class MatMul(nn.Module):
  """Parameter-free two-operand product (attention QKᵀ and softmax·V) as a named module so that
  quantization rules can target it."""
  equation: str

  @nn.compact
  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)


class Concat(nn.Module):
  """Channel concatenation of the U-Net's skip connection (Q-Diffusion quantizes its two halves apart)."""

  @nn.compact
  def __call__(self, a, b):
    return jnp.concatenate([a, b], axis=-1)


def group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
  """torch.nn.GroupNorm(groups, eps, affine=True): params `scale` / `bias`, two-pass variance."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


def layer_norm(eps: float, name: str, affine: bool = True) -> nn.LayerNorm:
  """torch.nn.LayerNorm(eps, elementwise_affine=affine) (flax's default eps is 1e-6, torch's 1e-5)."""
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False, name=name)


def conv3x3(features: int, name: str) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)


def _frequencies(half: int, freq_shift: float, max_period: float) -> np.ndarray:
  """exp(-ln(max_period) · i / (half - freq_shift)) as float32 constants, rounded from float64 so that they
  equal torch's correctly rounded float32 exp (XLA's exp may differ by an ulp, which a timestep of ~1000
  turns into ~1e-4 of error in the sinusoids)."""
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """diffusers' `get_timestep_embedding` (the `time_proj` of every model): [B] → [B, dim] sinusoids."""
  half = dim // 2
  emb = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * jnp.asarray(_frequencies(half, freq_shift,
                                                                                   max_period))[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """`linear_1` → SiLU → `linear_2`: the time-embedding MLP (TFMQ-DM reconstructs it on its own)."""
  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.dim, name="linear_2")(nn.silu(nn.Dense(self.dim, name="linear_1")(x)))


class ResnetBlock2D(nn.Module):
  """norm1 → SiLU → conv1 (+ time_emb_proj) → norm2 → SiLU → conv2, plus a 1×1 `conv_shortcut` when the
  channel count changes. `time_norm='scale_shift'` applies the time embedding as (1 + scale)·h + shift
  after norm2 (diffusers' resnet_time_scale_shift)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  temb: bool = True
  output_scale_factor: float = 1.0
  time_norm: str = "default"

  @nn.compact
  def __call__(self, x, temb=None):
    if self.time_norm not in TIME_EMBEDDING_NORMS:
      raise ValueError(f"ResnetBlock2D.time_norm={self.time_norm!r}; accepted values: {TIME_EMBEDDING_NORMS}")
    h = nn.silu(group_norm(self.groups, self.eps, "norm1")(x))
    h = conv3x3(self.out_channels, "conv1")(h)
    scale_shift = None
    if self.temb and temb is not None:
      width = self.out_channels * (2 if self.time_norm == "scale_shift" else 1)
      proj = nn.Dense(width, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
      if self.time_norm == "scale_shift":
        scale_shift = jnp.split(proj, 2, axis=-1)
      else:
        h = h + proj
    h = group_norm(self.groups, self.eps, "norm2")(h)
    if scale_shift is not None:
      h = h * (1 + scale_shift[0]) + scale_shift[1]
    h = conv3x3(self.out_channels, "conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Attention(nn.Module):
  """Multi-head attention: `to_q`/`to_k`/`to_v` (Dense), `qk_matmul`, scale, softmax, `sv_matmul`, `to_out_0`.

  A 4-D input [B, H, W, C] is the U-Net's / VAE's spatial self-attention block: optionally group-normed
  (`group_norm`), attended over the H·W positions, and added back to its input (residual, divided by
  `rescale_output_factor`). A 3-D input [B, N, C] is a transformer block's attention, [B, N, C] → [B, N, C]
  with no residual; `context` [B, L, D] makes it cross-attention.
  """
  heads: int
  dim_head: int
  out_dim: Optional[int] = None
  qkv_bias: bool = True
  group_norm: bool = False
  groups: int = 32
  eps: float = 1e-6
  rescale_output_factor: float = 1.0
  out_bias: bool = True

  @nn.compact
  def __call__(self, x, context=None):
    spatial = x.ndim == 4
    residual = x
    if self.group_norm:
      x = group_norm(self.groups, self.eps, "group_norm")(x)
    if spatial:
      b, hh, ww, c = x.shape
      x = x.reshape(b, hh * ww, c)
    ctx = x if context is None else context
    inner = self.heads * self.dim_head
    q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q")(x)
    k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k")(ctx)
    v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v")(ctx)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = MatMul("bhqd,bhkd->bhqk", name="qk_matmul")(q, k) * (self.dim_head ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1)
    out = MatMul("bhqk,bhkd->bhqd", name="sv_matmul")(probs, v)
    out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], inner)
    out = nn.Dense(self.out_dim or x.shape[-1], use_bias=self.out_bias, name="to_out_0")(out)
    if spatial:
      out = out.reshape(residual.shape)
      out = (out + residual) / self.rescale_output_factor
    return out


class _FFIn(nn.Module):
  """The feed-forward's input projection `net_0/proj`: GEGLU (gate = exact GELU, SD's) or tanh-GELU (DiT's)."""
  inner: int
  geglu: bool

  @nn.compact
  def __call__(self, x):
    if self.geglu:
      h, gate = jnp.split(nn.Dense(self.inner * 2, name="proj")(x), 2, axis=-1)
      return h * nn.gelu(gate, approximate=False)
    return nn.gelu(nn.Dense(self.inner, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
  """diffusers' FeedForward: `net_0` (activation with its projection), dropout (`net.1`), `net_2` Dense."""
  dim: int
  mult: int = 4
  geglu: bool = True

  @nn.compact
  def __call__(self, x):
    h = _FFIn(self.dim * self.mult, self.geglu, name="net_0")(x)
    return nn.Dense(self.dim, name="net_2")(h)


class Downsample2D(nn.Module):
  """Stride-2 3×3 `conv`. padding=0 pads right/bottom by one then convolves VALID, as diffusers does."""
  channels: int
  padding: int = 1

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return nn.Conv(self.channels, (3, 3), strides=2, padding="VALID", name="conv")(x)
    p = self.padding
    return nn.Conv(self.channels, (3, 3), strides=2, padding=((p, p), (p, p)), name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour ×2 then a 3×3 `conv`."""
  channels: int

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv3x3(self.channels, "conv")(x)
