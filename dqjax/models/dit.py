"""DiT as diffusers' DiTTransformer2DModel: patch embedding (`pos_embed/proj`) with fixed 2-D sin-cos
positions, adaLN-Zero transformer blocks, class labels with a null class (index num_embeds_ada_norm) for
classifier-free guidance, final adaLN (`proj_out_1`) and projection (`proj_out_2`), unpatchify; learned-sigma
models have out_channels = 2 × in_channels.

diffusers stores the timestep/class embedders inside every block (`transformer_blocks.N.norm1.emb`), and
so does this module, so that conversion is lossless; the final layer is conditioned on block 0's embedding,
as in diffusers. Targetable ops: `transformer_blocks_N/attn1/qk_matmul`, `.../sv_matmul`,
`transformer_blocks_N/norm1/emb/timestep_embedder` (the time-embedding MLP)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dqjax.models.configs import DiTConfig
from dqjax.models.layers import Attention, FeedForward, TimestepEmbedding, layer_norm, timestep_embedding


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int, base_size: int | None = None, interpolation_scale: float = 1.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [grid², dim] (diffusers' get_2d_sincos_pos_embed, square grid).

  Positions are scaled by base_size / grid (so a larger input interpolates the training grid) and divided by
  interpolation_scale. The first half of the channels encodes the column, the second half the row."""
  base = grid if base_size is None else base_size
  pos = np.arange(grid, dtype=np.float64) / (grid / base) / interpolation_scale
  col, row = np.meshgrid(pos, pos)  # col[i, j] = pos[j]
  return np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1).astype(np.float32)


class _LabelEmbedding(nn.Module):
  """diffusers' LabelEmbedding: one row per class plus the null class (`embedding_table`)."""
  rows: int
  dim: int

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.rows, self.dim, name="embedding_table")(labels)


class CombinedEmbedding(nn.Module):
  """CombinedTimestepLabelEmbeddings: timestep_embedder(256 sinusoids, flipped, shift 1) + class_embedder."""
  dim: int
  num_classes: int

  @nn.compact
  def __call__(self, t, labels):
    temb = TimestepEmbedding(self.dim, name="timestep_embedder")(timestep_embedding(t, 256, True, 1))
    return temb + _LabelEmbedding(self.num_classes + 1, self.dim, name="class_embedder")(labels)


class AdaLayerNormZero(nn.Module):
  """`norm1`: emb → SiLU → `linear` (6 × dim: shift/scale/gate for attention and MLP); LayerNorm eps 1e-6."""
  dim: int
  num_classes: int

  @nn.compact
  def __call__(self, x, t, labels):
    emb = CombinedEmbedding(self.dim, self.num_classes, name="emb")(t, labels)
    mods = nn.Dense(6 * self.dim, name="linear")(nn.silu(emb))
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)
    x = layer_norm(1e-6, "norm", affine=False)(x)
    return x * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp, emb


class DiTBlock(nn.Module):
  """BasicTransformerBlock with norm_type='ada_norm_zero': gated attn1 and gated tanh-GELU ff (after norm3)."""
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, t, labels):
    c = self.cfg
    h, gate, shift_mlp, scale_mlp, gate_mlp, emb = AdaLayerNormZero(c.inner_dim, c.num_embeds_ada_norm,
                                                                    name="norm1")(x, t, labels)
    x = x + gate[:, None] * Attention(c.num_attention_heads, c.attention_head_dim, qkv_bias=c.attention_bias,
                                      name="attn1")(h)
    h = layer_norm(c.norm_eps, "norm3", affine=False)(x)
    h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp[:, None] * FeedForward(c.inner_dim, geglu=False, name="ff")(h)
    return x, emb


class PatchEmbed(nn.Module):
  """`proj`: patch_size × patch_size stride-patch conv, then + fixed sin-cos positions (not parameters)."""
  dim: int
  patch: int
  base_size: int
  interpolation_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID", name="proj")(x)
    b, gh, gw, d = h.shape
    pos = sincos_2d(d, gh, self.base_size, self.interpolation_scale)
    return h.reshape(b, gh * gw, d) + jnp.asarray(pos)[None]


class DiTTransformer2DModel(nn.Module):
  """`__call__(x [B,H,W,C], t [B], cond = int class labels [B])` → [B,H,W,out_channels] (square inputs)."""
  config: DiTConfig

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    if cond is None:
      raise ValueError("DiTTransformer2DModel is class-conditional: pass int class labels [B] as `cond` "
                       f"(use {c.num_embeds_ada_norm} for the null class)")
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f"DiTTransformer2DModel expects x of shape [B, H, W, {c.in_channels}]; got {x.shape}")
    b, hh, ww, _ = x.shape
    p = c.patch_size
    if hh != ww or hh % p:
      raise ValueError(f"DiTTransformer2DModel needs square inputs with sides a multiple of patch_size={p} "
                       f"(as diffusers); got {hh}×{ww}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    labels = jnp.asarray(cond).astype(jnp.int32)
    h = PatchEmbed(c.inner_dim, p, c.sample_size // p, c.interpolation_scale, name="pos_embed")(x)
    first_emb = None
    for i in range(c.num_layers):
      h, emb = DiTBlock(c, name=f"transformer_blocks_{i}")(h, t, labels)
      first_emb = emb if first_emb is None else first_emb
    shift, scale = jnp.split(nn.Dense(2 * c.inner_dim, name="proj_out_1")(nn.silu(first_emb)), 2, axis=-1)
    h = layer_norm(1e-6, "norm_out", affine=False)(h)
    h = h * (1 + scale[:, None]) + shift[:, None]
    h = nn.Dense(p * p * c.out, name="proj_out_2")(h)
    gh, gw = hh // p, ww // p
    h = h.reshape(b, gh, gw, p, p, c.out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hh, ww, c.out)
