"""DiT as diffusers' DiTTransformer2DModel: patch embedding with fixed 2-D sin-cos positions, adaLN-Zero
transformer blocks, class labels with a null class (index num_embeds_ada_norm) for classifier-free
guidance, unpatchify; optional learned-sigma channels (out_channels = 2 × in_channels).

diffusers stores the timestep/class embedders inside every block (`transformer_blocks.N.norm1.emb`); so
does this module, so that conversion is lossless. The final layer is conditioned on block 0's embedding."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dqjax.models.configs import DiTConfig
from dqjax.models.layers import Attention, TimestepEmbedding, timestep_embedding
from dqjax.models.unet import FeedForward


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [grid², dim] (MAE / DiT / diffusers' get_2d_sincos_pos_embed)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  # diffusers: grid = meshgrid(w, h); emb_h from grid[0], emb_w from grid[1]
  emb_h = one_d(dim // 2, gh)
  emb_w = one_d(dim // 2, gw)
  return np.concatenate([emb_h, emb_w], axis=1).astype(np.float32)


class CombinedEmbedding(nn.Module):
  dim: int
  num_classes: int

  @nn.compact
  def __call__(self, t, labels):
    temb = TimestepEmbedding(self.dim, name="timestep_embedder")(timestep_embedding(t, 256, True, 1))
    return temb + _LabelEmbedding(self.num_classes + 1, self.dim, name="class_embedder")(labels)


class _LabelEmbedding(nn.Module):
  """diffusers' LabelEmbedding: one row per class plus the null class (`embedding_table`)."""
  rows: int
  dim: int

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.rows, self.dim, name="embedding_table")(labels)


class AdaLayerNormZero(nn.Module):
  dim: int
  num_classes: int
  eps: float

  @nn.compact
  def __call__(self, x, t, labels):
    emb = CombinedEmbedding(self.dim, self.num_classes, name="emb")(t, labels)
    mods = nn.Dense(6 * self.dim, name="linear")(nn.silu(emb))
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)
    x = nn.LayerNorm(epsilon=self.eps, use_bias=False, use_scale=False, name="norm")(x)
    return x * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp, emb


class DiTBlock(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, t, labels):
    c = self.cfg
    h, gate, shift_mlp, scale_mlp, gate_mlp, emb = AdaLayerNormZero(c.inner_dim, c.num_embeds_ada_norm,
                                                                    c.norm_eps, name="norm1")(x, t, labels)
    x = x + gate[:, None] * Attention(c.num_attention_heads, c.attention_head_dim, name="attn1")(h)
    h = nn.LayerNorm(epsilon=c.norm_eps, use_bias=False, use_scale=False, name="norm2")(x)
    h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp[:, None] * FeedForward(c.inner_dim, geglu=False, name="ff")(h)
    return x, emb


class PatchEmbed(nn.Module):
  dim: int
  patch: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID", name="proj")(x)
    b, gh, gw, d = h.shape
    return h.reshape(b, gh * gw, d) + jnp.asarray(sincos_2d(d, gh))[None]


class DiTTransformer2DModel(nn.Module):
  """__call__(x [B,H,W,C], t [B], class_labels [B]) → [B,H,W,out_channels]."""
  config: DiTConfig

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    if cond is None:
      raise ValueError("DiTTransformer2DModel is class-conditional: pass class labels as `cond` "
                       f"(use {c.num_embeds_ada_norm} for the null class)")
    b, hh, ww, _ = x.shape
    p = c.patch_size
    h = PatchEmbed(c.inner_dim, p, name="pos_embed")(x)
    first_emb = None
    for i in range(c.num_layers):
      h, emb = DiTBlock(c, name=f"transformer_blocks_{i}")(h, t, cond)
      first_emb = emb if first_emb is None else first_emb
    shift, scale = jnp.split(nn.Dense(2 * c.inner_dim, name="proj_out_1")(nn.silu(first_emb)), 2, axis=-1)
    h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, name="norm_out")(h)
    h = h * (1 + scale[:, None]) + shift[:, None]
    h = nn.Dense(p * p * c.out, name="proj_out_2")(h)
    gh, gw = hh // p, ww // p
    h = h.reshape(b, gh, gw, p, p, c.out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hh, ww, c.out)
