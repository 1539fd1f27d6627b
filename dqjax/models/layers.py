"""Building blocks shared by the U-Nets, the DiT and the autoencoder, named as diffusers names them.

Two parameter-free ops are modules only so that quantization rules can target them by path:
`MatMul` (attention QKᵀ and softmax·V) and `Concat` (the U-Net's skip concatenation).
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class MatMul(nn.Module):
  """Parameter-free two-operand product (attention QKᵀ and softmax·V) as a named module so that
  quantization rules can target it."""
  equation: str

  @nn.compact
  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)


class Concat(nn.Module):
  """Channel concatenation of the U-Net's skip connection (Q-Diffusion splits its quantization)."""

  @nn.compact
  def __call__(self, a, b):
    return jnp.concatenate([a, b], axis=-1)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """diffusers' get_timestep_embedding."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 → SiLU → linear_2 (the time-embedding MLP that TFMQ-DM reconstructs on its own)."""
  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.dim, name="linear_2")(nn.silu(nn.Dense(self.dim, name="linear_1")(x)))


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  temb: bool = True
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1")(x))
    h = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(h)
    if self.temb and temb is not None:
      h = h + nn.Dense(self.out_channels, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h))
    h = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Attention(nn.Module):
  """Multi-head attention with named QKᵀ and softmax·V ops.

  For the U-Net's spatial self-attention (`group_norm=True`) the input is [B, H, W, C], normalised,
  attended over positions and added back (residual); for transformer blocks it is [B, N, C] → [B, N, C].
  """
  heads: int
  dim_head: int
  out_dim: Optional[int] = None
  qkv_bias: bool = True
  group_norm: bool = False
  groups: int = 32
  eps: float = 1e-6
  rescale_output_factor: float = 1.0

  @nn.compact
  def __call__(self, x, context=None):
    spatial = x.ndim == 4
    residual = x
    if self.group_norm:
      x = nn.GroupNorm(self.groups, epsilon=self.eps, name="group_norm")(x)
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
    out = nn.Dense(self.out_dim or x.shape[-1], name="to_out_0")(out)
    if spatial:
      out = out.reshape(residual.shape)
      out = (out + residual) / self.rescale_output_factor
    return out


class Downsample2D(nn.Module):
  channels: int
  padding: int = 1

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      # diffusers pads right/bottom only, then a VALID stride-2 convolution.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return nn.Conv(self.channels, (3, 3), strides=2, padding="VALID", name="conv")(x)
    p = self.padding
    return nn.Conv(self.channels, (3, 3), strides=2, padding=((p, p), (p, p)), name="conv")(x)


class Upsample2D(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)
