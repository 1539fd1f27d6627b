"""diffusers' first-stage models for latent diffusion: `AutoencoderKL` (Gaussian latent) and `VQModel`
(vector-quantized latent). Both share diffusers' Encoder / Decoder (names `encoder/down_blocks_i/resnets_j`,
`decoder/up_blocks_i/...`, `*/mid_block/attentions_0`), and expose `encode` / `decode` for
`model.apply(variables, x, method=model.encode)`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqjax.models.configs import AutoencoderKLConfig, VQModelConfig
from dqjax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv3x3, group_norm

_EPS = 1e-6  # diffusers' Encoder/Decoder use eps 1e-6 everywhere


class _Mid(nn.Module):
  """UNetMidBlock2D without time embedding: resnet, one-head self-attention over all channels, resnet."""
  channels: int
  groups: int
  attention: bool = True

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(self.channels, self.groups, _EPS, temb=False, name="resnets_0")(x)
    if self.attention:
      x = Attention(1, self.channels, group_norm=True, groups=self.groups, eps=_EPS, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, _EPS, temb=False, name="resnets_1")(x)


class _EncBlock(nn.Module):
  """DownEncoderBlock2D: resnets, then a stride-2 conv padded right/bottom (downsample_padding=0)."""
  channels: int
  layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.channels, self.groups, _EPS, temb=False, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample2D(self.channels, 0, name="downsamplers_0")(x)
    return x


class _DecBlock(nn.Module):
  """UpDecoderBlock2D: resnets, then nearest ×2 + conv."""
  channels: int
  layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.channels, self.groups, _EPS, temb=False, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample2D(self.channels, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """conv_in → down blocks → mid block → GroupNorm/SiLU → conv_out (`out_channels` latent channels)."""
  cfg: AutoencoderKLConfig | VQModelConfig
  out_channels: int

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    ch = c.block_out_channels
    h = conv3x3(ch[0], "conv_in")(x)
    for i in range(len(ch)):
      h = _EncBlock(ch[i], c.layers_per_block, c.norm_num_groups, i < len(ch) - 1, name=f"down_blocks_{i}")(h)
    h = _Mid(ch[-1], c.norm_num_groups, c.mid_block_add_attention, name="mid_block")(h)
    h = nn.silu(group_norm(c.norm_num_groups, _EPS, "conv_norm_out")(h))
    return conv3x3(self.out_channels, "conv_out")(h)


class Decoder(nn.Module):
  """conv_in → mid block → up blocks (layers_per_block + 1 resnets each) → GroupNorm/SiLU → conv_out."""
  cfg: AutoencoderKLConfig | VQModelConfig

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    rev = list(reversed(c.block_out_channels))
    h = conv3x3(rev[0], "conv_in")(z)
    h = _Mid(rev[0], c.norm_num_groups, c.mid_block_add_attention, name="mid_block")(h)
    for i in range(len(rev)):
      h = _DecBlock(rev[i], c.layers_per_block + 1, c.norm_num_groups, i < len(rev) - 1, name=f"up_blocks_{i}")(h)
    h = nn.silu(group_norm(c.norm_num_groups, _EPS, "conv_norm_out")(h))
    return conv3x3(c.out_channels, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """`encode(x) -> (mean, logvar)` (logvar clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution),
  `decode(z) -> x`, `sample(x, rng)` draws a latent; `__call__(x)` reconstructs from the mean.
  Latents for diffusion are `(z - shift_factor) * scaling_factor` (config)."""
  config: AutoencoderKLConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, 2 * c.latent_channels)
    self.decoder = Decoder(c)
    self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1)) if c.use_quant_conv else None
    self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1)) if c.use_post_quant_conv else None

  def encode(self, x):
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def sample(self, x, rng):
    mean, logvar = self.encode(x)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, z):
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)


class VectorQuantizer(nn.Module):
  """Nearest codebook entry (`embedding` [num_vq_embeddings, dim]) per position, straight-through gradient."""
  num_embeddings: int
  dim: int

  @nn.compact
  def __call__(self, z):
    codebook = nn.Embed(self.num_embeddings, self.dim, name="embedding")
    table = codebook.embedding
    flat = z.reshape(-1, self.dim)
    d2 = (jnp.sum(flat ** 2, axis=1, keepdims=True) - 2 * flat @ table.T + jnp.sum(table ** 2, axis=1)[None])
    idx = jnp.argmin(d2, axis=1)
    z_q = codebook(idx).reshape(z.shape)
    return z + jax.lax.stop_gradient(z_q - z), idx.reshape(z.shape[:-1])


class VQModel(nn.Module):
  """diffusers' VQModel. `encode(x)` → latents before quantization (as diffusers' `encode(...).latents`),
  `quantize_latents(h)` → (quantized, code indices [B,h,w]), `decode(h, force_not_quantize=False)` →
  image (quantizes first unless told not to, as diffusers), `__call__(x) = decode(encode(x))`."""
  config: VQModelConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, c.latent_channels)
    self.quant_conv = nn.Conv(c.embed_dim, (1, 1))
    self.quantize = VectorQuantizer(c.num_vq_embeddings, c.embed_dim)
    self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1))
    self.decoder = Decoder(c)

  def encode(self, x):
    return self.quant_conv(self.encoder(x))

  def quantize_latents(self, h):
    return self.quantize(h)

  def decode(self, h, force_not_quantize: bool = False):
    quant = h if force_not_quantize else self.quantize(h)[0]
    return self.decoder(self.post_quant_conv(quant))

  def __call__(self, x):
    return self.decode(self.encode(x))
