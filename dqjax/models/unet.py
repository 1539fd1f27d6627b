"""U-Nets as diffusers builds them: `UNet2DModel` (DDPM / LDM unconditional and class-conditional) and the
cross-attention `UNet2DConditionModel` (Stable-Diffusion style).

Parameter paths mirror diffusers' state-dict names ('down_blocks.0.resnets.1.conv1' →
'down_blocks_0/resnets_1/conv1'). Targetable parameter-free ops: `up_blocks_i/skip_concat_j` (the skip
concatenation feeding `up_blocks_i/resnets_j`) and `.../qk_matmul`, `.../sv_matmul` inside every attention.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from dqjax.models.configs import UNet2DConditionConfig, UNet2DConfig
from dqjax.models.layers import (Attention, Concat, Downsample2D, FeedForward, ResnetBlock2D, TimestepEmbedding,
                                 Upsample2D, conv3x3, group_norm, layer_norm, timestep_embedding)


def _resnet(out_channels: int, c, name: str, scale: float = 1.0) -> ResnetBlock2D:
  return ResnetBlock2D(out_channels, c.norm_num_groups, c.norm_eps, output_scale_factor=scale,
                       time_norm=c.resnet_time_scale_shift, name=name)


def _spatial_attention(channels: int, c: UNet2DConfig, name: str, groups: Optional[int] = None,
                       rescale: float = 1.0) -> Attention:
  """The U-Net's self-attention block: heads = channels // attention_head_dim, group-normed input, residual."""
  dh = c.head_dim(channels)
  g = c.norm_num_groups if groups is None else groups
  return Attention(channels // dh, dh, group_norm=g > 0, groups=max(g, 1), eps=c.norm_eps,
                   rescale_output_factor=rescale, name=name)


def _time_embedding(t, c, batch: int):
  """time_proj (sinusoids, not a module: no parameters) → time_embedding MLP; t broadcast to the batch."""
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
  emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
  return TimestepEmbedding(c.time_embed_dim, name="time_embedding")(emb)


def _take_skips(skips: list, n: int) -> tuple[list, list]:
  return skips[-n:], skips[:-n]


class DownBlock(nn.Module):
  """DownBlock2D / AttnDownBlock2D: resnets (each followed by its attention) then a stride-2 downsampler."""
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
      x = _resnet(self.out_channels, c, f"resnets_{j}")(x, temb)
      if self.attention:
        x = _spatial_attention(self.out_channels, c, f"attentions_{j}")(x)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, c.downsample_padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """UpBlock2D / AttnUpBlock2D: per layer, `skip_concat_j` of the running features with a skip, a resnet (and
  its attention); then a nearest ×2 upsampler."""
  out_channels: int
  layers: int
  attention: bool
  add_upsample: bool
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, skips, temb):
    c = self.cfg
    skips = list(skips)
    for j in range(self.layers):
      x = Concat(name=f"skip_concat_{j}")(x, skips.pop())
      x = _resnet(self.out_channels, c, f"resnets_{j}")(x, temb)
      if self.attention:
        x = _spatial_attention(self.out_channels, c, f"attentions_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """UNetMidBlock2D: resnet, self-attention (unless add_attention=False), resnet."""
  channels: int
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, temb):
    c = self.cfg
    s = c.mid_block_scale_factor
    x = _resnet(self.channels, c, "resnets_0", s)(x, temb)
    if c.add_attention:
      # diffusers: group norm with attn_norm_num_groups, else norm_num_groups unless scale_shift (then none)
      groups = c.attn_norm_num_groups
      if groups is None:
        groups = c.norm_num_groups if c.resnet_time_scale_shift == "default" else 0
      x = _spatial_attention(self.channels, c, "attentions_0", groups=groups, rescale=s)(x)
    return _resnet(self.channels, c, "resnets_1", s)(x, temb)


class UNet2DModel(nn.Module):
  """diffusers' UNet2DModel: `__call__(x [B,H,W,C], t [B], cond)` → [B,H,W,out_channels].

  `cond` is None, or int class labels [B] when `num_class_embeds` is set (the table `class_embedding`
  then holds any null class used for classifier-free guidance, e.g. 11 rows for 10 classes)."""
  config: UNet2DConfig

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    ch = c.block_out_channels
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f"UNet2DModel expects x of shape [B, H, W, {c.in_channels}]; got {x.shape}")
    if c.center_input_sample:
      x = 2 * x - 1.0
    temb = _time_embedding(t, c, x.shape[0])
    if c.num_class_embeds is not None:
      if cond is None:
        raise ValueError("this UNet2DModel is class-conditional (num_class_embeds="
                         f"{c.num_class_embeds}): pass int class labels [B] as `cond`")
      labels = jnp.asarray(cond).astype(jnp.int32)
      temb = temb + nn.Embed(c.num_class_embeds, c.time_embed_dim, name="class_embedding")(labels)
    elif cond is not None:
      raise ValueError("this UNet2DModel is unconditional (num_class_embeds is None): pass cond=None")
    h = conv3x3(ch[0], "conv_in")(x)
    skips = [h]
    n = len(ch)
    for i, kind in enumerate(c.down_block_types):
      h, s = DownBlock(ch[i], c.layers_per_block, kind == "AttnDownBlock2D", i < n - 1, c,
                       name=f"down_blocks_{i}")(h, temb)
      skips += s
    if c.mid_block_type is not None:
      h = MidBlock(ch[-1], c, name="mid_block")(h, temb)
    rev = list(reversed(ch))
    for i, kind in enumerate(c.up_block_types):
      take = c.layers_per_block + 1
      block_skips, skips = _take_skips(skips, take)
      h = UpBlock(rev[i], take, kind == "AttnUpBlock2D", i < n - 1, c, name=f"up_blocks_{i}")(h, block_skips, temb)
    h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(h))
    return conv3x3(c.out_channels, "conv_out")(h)


# --- cross-attention U-Net ---------------------------------------------------------------------------------
class BasicTransformerBlock(nn.Module):
  """norm1 → attn1 (self) → norm2 → attn2 (cross, over `context`) → norm3 → ff (GEGLU); all residual."""
  dim: int
  heads: int
  cross_dim: Optional[int]
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, context):
    dh = self.dim // self.heads
    x = x + Attention(self.heads, dh, qkv_bias=False, name="attn1")(layer_norm(self.eps, "norm1")(x))
    x = x + Attention(self.heads, dh, qkv_bias=False, name="attn2")(layer_norm(self.eps, "norm2")(x), context)
    return x + FeedForward(self.dim, geglu=True, name="ff")(layer_norm(self.eps, "norm3")(x))


class Transformer2D(nn.Module):
  """Transformer2DModel over a feature map: GroupNorm (eps 1e-6), proj_in (1×1 conv, or Dense when
  use_linear_projection), `layers` BasicTransformerBlocks, proj_out, residual."""
  channels: int
  heads: int
  cross_dim: int
  groups: int
  linear_projection: bool
  layers: int = 1

  @nn.compact
  def __call__(self, x, context):
    b, hh, ww, c = x.shape
    residual = x
    h = group_norm(self.groups, 1e-6, "norm")(x)
    if self.linear_projection:
      h = nn.Dense(c, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = nn.Conv(c, (1, 1), name="proj_in")(h).reshape(b, hh * ww, c)
    for k in range(self.layers):
      h = BasicTransformerBlock(c, self.heads, self.cross_dim, name=f"transformer_blocks_{k}")(h, context)
    if self.linear_projection:
      h = nn.Dense(c, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = nn.Conv(c, (1, 1), name="proj_out")(h.reshape(b, hh, ww, c))
    return h + residual


def _transformer(c: UNet2DConditionConfig, channels: int, block: int, name: str) -> Transformer2D:
  """The Transformer2D of down-block index `block` (the up blocks pass their mirrored down index)."""
  return Transformer2D(channels, c.heads()[block], c.per_block("cross_attention_dim")[block], c.norm_num_groups,
                       c.use_linear_projection, c.per_block("transformer_layers_per_block")[block], name=name)


class CrossAttnDownBlock(nn.Module):
  """CrossAttnDownBlock2D (cross=True) or DownBlock2D (cross=False)."""
  out_channels: int
  layers: int
  cross: bool
  add_downsample: bool
  cfg: UNet2DConditionConfig
  block: int = 0

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.cfg
    skips = []
    for j in range(self.layers):
      x = _resnet(self.out_channels, c, f"resnets_{j}")(x, temb)
      if self.cross:
        x = _transformer(c, self.out_channels, self.block, f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, c.downsample_padding, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class CrossAttnUpBlock(nn.Module):
  """CrossAttnUpBlock2D (cross=True) or UpBlock2D (cross=False); `block` is the mirrored down-block index."""
  out_channels: int
  layers: int
  cross: bool
  add_upsample: bool
  cfg: UNet2DConditionConfig
  block: int = 0

  @nn.compact
  def __call__(self, x, skips, temb, context):
    c = self.cfg
    skips = list(skips)
    for j in range(self.layers):
      x = Concat(name=f"skip_concat_{j}")(x, skips.pop())
      x = _resnet(self.out_channels, c, f"resnets_{j}")(x, temb)
      if self.cross:
        x = _transformer(c, self.out_channels, self.block, f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0")(x)
    return x


class MidBlockCrossAttn(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, Transformer2D, resnet."""
  channels: int
  cfg: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, temb, context):
    c = self.cfg
    s = c.mid_block_scale_factor
    x = _resnet(self.channels, c, "resnets_0", s)(x, temb)
    x = _transformer(c, self.channels, len(c.block_out_channels) - 1, "attentions_0")(x, context)
    return _resnet(self.channels, c, "resnets_1", s)(x, temb)


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel subset: `__call__(x, t, cond)` with cond = encoder_hidden_states
  [B, L, cross_attention_dim] → [B,H,W,out_channels]."""
  config: UNet2DConditionConfig

  @nn.compact
  def __call__(self, x, t, cond: Any = None):
    c = self.config
    if cond is None:
      raise ValueError("UNet2DConditionModel needs encoder_hidden_states as `cond` ([B, L, cross_attention_dim])")
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f"UNet2DConditionModel expects x of shape [B, H, W, {c.in_channels}]; got {x.shape}")
    ch = c.block_out_channels
    layers = c.per_block("layers_per_block")
    if c.center_input_sample:
      x = 2 * x - 1.0
    temb = _time_embedding(t, c, x.shape[0])
    h = conv3x3(ch[0], "conv_in")(x)
    skips = [h]
    n = len(ch)
    for i, kind in enumerate(c.down_block_types):
      h, s = CrossAttnDownBlock(ch[i], layers[i], kind == "CrossAttnDownBlock2D", i < n - 1, c, block=i,
                                name=f"down_blocks_{i}")(h, temb, cond)
      skips += s
    h = MidBlockCrossAttn(ch[-1], c, name="mid_block")(h, temb, cond)
    rev = list(reversed(ch))
    for i, kind in enumerate(c.up_block_types):
      take = layers[n - 1 - i] + 1
      block_skips, skips = _take_skips(skips, take)
      h = CrossAttnUpBlock(rev[i], take, kind == "CrossAttnUpBlock2D", i < n - 1, c, block=n - 1 - i,
                           name=f"up_blocks_{i}")(h, block_skips, temb, cond)
    h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(h))
    return conv3x3(c.out_channels, "conv_out")(h)
