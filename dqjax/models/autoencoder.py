"""diffusers' AutoencoderKL (encoder → Gaussian latent → decoder) for latent diffusion."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dqjax.models.configs import AutoencoderKLConfig
from dqjax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D


class _Mid(nn.Module):
  channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(self.channels, self.groups, 1e-6, temb=False, name="resnets_0")(x)
    x = Attention(1, self.channels, group_norm=True, groups=self.groups, eps=1e-6, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, 1e-6, temb=False, name="resnets_1")(x)


class _EncBlock(nn.Module):
  channels: int
  layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.channels, self.groups, 1e-6, temb=False, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample2D(self.channels, 0, name="downsamplers_0")(x)
    return x


class _DecBlock(nn.Module):
  channels: int
  layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.channels, self.groups, 1e-6, temb=False, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample2D(self.channels, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    ch = c.block_out_channels
    h = nn.Conv(ch[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(x)
    for i in range(len(ch)):
      h = _EncBlock(ch[i], c.layers_per_block, c.norm_num_groups, i < len(ch) - 1, name=f"down_blocks_{i}")(h)
    h = _Mid(ch[-1], c.norm_num_groups, name="mid_block")(h)
    h = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=1e-6, name="conv_norm_out")(h))
    return nn.Conv(2 * c.latent_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)


class Decoder(nn.Module):
  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    rev = list(reversed(c.block_out_channels))
    h = nn.Conv(rev[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(z)
    h = _Mid(rev[0], c.norm_num_groups, name="mid_block")(h)
    for i in range(len(rev)):
      h = _DecBlock(rev[i], c.layers_per_block + 1, c.norm_num_groups, i < len(rev) - 1, name=f"up_blocks_{i}")(h)
    h = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=1e-6, name="conv_norm_out")(h))
    return nn.Conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """`encode(x) -> (mean, logvar)`, `decode(z) -> x`; `__call__` reconstructs from the mean (for init)."""
  config: AutoencoderKLConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1))
    self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1))

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)
