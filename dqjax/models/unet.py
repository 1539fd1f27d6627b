"""U-Nets as diffusers builds them: `UNet2DModel` (DDPM / LDM unconditional and class-conditional) and
the cross-attention `UNet2DConditionModel` (Stable-Diffusion style). Parameter paths mirror diffusers'
state-dict names ('down_blocks.0.resnets.1.conv1' → 'down_blocks_0/resnets_1/conv1')."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from dqjax.models.configs import UNet2DConditionConfig, UNet2DConfig
from dqjax.models.layers import (Attention, Concat, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D,
                                 timestep_embedding)


def _unet_heads(channels: int, head_dim: Optional[int]) -> tuple[int, int]:
  if head_dim is None:
    return 1, channels
  return channels // head_dim, head_dim


class DownBlock(nn.Module):
  out_channels: int
  layers: int
  attention: bool
  add_downsample: bool
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, temb):
    c = self.cfg
    skips = []
    for j in range(self.layers):
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps, name=f"resnets_{j}")(x, temb)
      if self.attention:
        heads, dh = _unet_heads(self.out_channels, c.attention_head_dim)
        x = Attention(heads, dh, group_norm=True, groups=c.norm_num_groups, eps=c.norm_eps,
                      name=f"attentions_{j}")(x)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, c.downsample_padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  out_channels: int
  layers: int
  attention: bool
  add_upsample: bool
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, skips, temb):
    c = self.cfg
    for j in range(self.layers):
      x = Concat(name=f"skip_concat_{j}")(x, skips.pop())
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps, name=f"resnets_{j}")(x, temb)
      if self.attention:
        heads, dh = _unet_heads(self.out_channels, c.attention_head_dim)
        x = Attention(heads, dh, group_norm=True, groups=c.norm_num_groups, eps=c.norm_eps,
                      name=f"attentions_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  channels: int
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, temb):
    c = self.cfg
    x = ResnetBlock2D(self.channels, c.norm_num_groups, c.norm_eps, name="resnets_0")(x, temb)
    heads, dh = _unet_heads(self.channels, c.attention_head_dim)
    x = Attention(heads, dh, group_norm=True, groups=c.norm_num_groups, eps=c.norm_eps,
                  rescale_output_factor=c.mid_block_scale_factor, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, c.norm_num_groups, c.norm_eps, name="resnets_1")(x, temb)


class UNet2DModel(nn.Module):
  """diffusers' UNet2DModel: __call__(x [B,H,W,C], t [B], class_labels [B] or None) → ε [B,H,W,C_out]."""
  config: UNet2DConfig

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    ch = c.block_out_channels
    temb = timestep_embedding(t, ch[0], c.flip_sin_to_cos, c.freq_shift)
    temb = TimestepEmbedding(ch[0] * 4, name="time_embedding")(temb)
    if c.num_class_embeds is not None:
      if cond is None:
        raise ValueError("this UNet2DModel is class-conditional: pass class labels as `cond`")
      temb = temb + nn.Embed(c.num_class_embeds, ch[0] * 4, name="class_embedding")(cond)
    h = nn.Conv(ch[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(x)
    skips = [h]
    n = len(ch)
    for i, kind in enumerate(c.down_block_types):
      h, s = DownBlock(ch[i], c.layers_per_block, kind == "AttnDownBlock2D", i < n - 1, c,
                       name=f"down_blocks_{i}")(h, temb)
      skips += s
    h = MidBlock(ch[-1], c, name="mid_block")(h, temb)
    rev = list(reversed(ch))
    for i, kind in enumerate(c.up_block_types):
      take = c.layers_per_block + 1
      block_skips, skips = skips[-take:], skips[:-take]
      h = UpBlock(rev[i], take, kind == "AttnUpBlock2D", i < n - 1, c, name=f"up_blocks_{i}")(h, block_skips,
                                                                                                 temb)
    h = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, name="conv_norm_out")(h))
    return nn.Conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)


# --- cross-attention U-Net ---------------------------------------------------------------------------------
class _Proj(nn.Module):
  """GEGLU (gated GELU, SD's feed-forward) or tanh-GELU (DiT's) input projection, named `net_0/proj`."""
  inner: int
  geglu: bool

  @nn.compact
  def __call__(self, x):
    if self.geglu:
      h, gate = jnp.split(nn.Dense(self.inner * 2, name="proj")(x), 2, axis=-1)
      return h * nn.gelu(gate, approximate=False)
    return nn.gelu(nn.Dense(self.inner, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
  dim: int
  mult: int = 4
  geglu: bool = True

  @nn.compact
  def __call__(self, x):
    h = _Proj(self.dim * self.mult, self.geglu, name="net_0")(x)
    return nn.Dense(self.dim, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  dim: int
  heads: int
  cross_dim: Optional[int]

  @nn.compact
  def __call__(self, x, context):
    dh = self.dim // self.heads
    x = x + Attention(self.heads, dh, qkv_bias=False, name="attn1")(nn.LayerNorm(name="norm1")(x))
    x = x + Attention(self.heads, dh, qkv_bias=False, name="attn2")(nn.LayerNorm(name="norm2")(x), context)
    return x + FeedForward(self.dim, name="ff")(nn.LayerNorm(name="norm3")(x))


class Transformer2D(nn.Module):
  channels: int
  heads: int
  cross_dim: int
  groups: int
  linear_projection: bool

  @nn.compact
  def __call__(self, x, context):
    b, hh, ww, c = x.shape
    residual = x
    h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm")(x)
    if self.linear_projection:
      h = nn.Dense(c, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = nn.Conv(c, (1, 1), name="proj_in")(h).reshape(b, hh * ww, c)
    h = BasicTransformerBlock(c, self.heads, self.cross_dim, name="transformer_blocks_0")(h, context)
    if self.linear_projection:
      h = nn.Dense(c, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = nn.Conv(c, (1, 1), name="proj_out")(h.reshape(b, hh, ww, c))
    return h + residual


class CrossAttnDownBlock(nn.Module):
  out_channels: int
  layers: int
  cross: bool
  add_downsample: bool
  cfg: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.cfg
    skips = []
    for j in range(self.layers):
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps, name=f"resnets_{j}")(x, temb)
      if self.cross:
        x = Transformer2D(self.out_channels, _heads(c), c.cross_attention_dim, c.norm_num_groups,
                          c.use_linear_projection, name=f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, c.downsample_padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class CrossAttnUpBlock(nn.Module):
  out_channels: int
  layers: int
  cross: bool
  add_upsample: bool
  cfg: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, skips, temb, context):
    c = self.cfg
    for j in range(self.layers):
      x = Concat(name=f"skip_concat_{j}")(x, skips.pop())
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps, name=f"resnets_{j}")(x, temb)
      if self.cross:
        x = Transformer2D(self.out_channels, _heads(c), c.cross_attention_dim, c.norm_num_groups,
                          c.use_linear_projection, name=f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlockCrossAttn(nn.Module):
  channels: int
  cfg: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.cfg
    x = ResnetBlock2D(self.channels, c.norm_num_groups, c.norm_eps, name="resnets_0")(x, temb)
    x = Transformer2D(self.channels, _heads(c), c.cross_attention_dim, c.norm_num_groups,
                      c.use_linear_projection, name="attentions_0")(x, context)
    return ResnetBlock2D(self.channels, c.norm_num_groups, c.norm_eps, name="resnets_1")(x, temb)


def _heads(c: UNet2DConditionConfig) -> int:
  return c.attention_head_dim if isinstance(c.attention_head_dim, int) else c.attention_head_dim[0]


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel subset: __call__(x, t, encoder_hidden_states [B, L, D]) → ε."""
  config: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    if cond is None:
      raise ValueError("UNet2DConditionModel needs encoder_hidden_states as `cond` ([B, L, cross_attention_dim])")
    ch = c.block_out_channels
    temb = timestep_embedding(t, ch[0], c.flip_sin_to_cos, c.freq_shift)
    temb = TimestepEmbedding(ch[0] * 4, name="time_embedding")(temb)
    h = nn.Conv(ch[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(x)
    skips = [h]
    n = len(ch)
    for i, kind in enumerate(c.down_block_types):
      h, s = CrossAttnDownBlock(ch[i], c.layers_per_block, kind == "CrossAttnDownBlock2D", i < n - 1, c,
                                name=f"down_blocks_{i}")(h, temb, cond)
      skips += s
    h = MidBlockCrossAttn(ch[-1], c, name="mid_block")(h, temb, cond)
    rev = list(reversed(ch))
    for i, kind in enumerate(c.up_block_types):
      take = c.layers_per_block + 1
      block_skips, skips = skips[-take:], skips[:-take]
      h = CrossAttnUpBlock(rev[i], take, kind == "CrossAttnUpBlock2D", i < n - 1, c,
                           name=f"up_blocks_{i}")(h, block_skips, temb, cond)
    h = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, name="conv_norm_out")(h))
    return nn.Conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)
