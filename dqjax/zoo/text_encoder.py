"""A tiny caption encoder for the Stable-Diffusion analogue: token + position embeddings and a few
pre-norm transformer layers, trained jointly with sd-mnist's U-Net. Like CLIP's text tower in the SD
papers, it stays in float: methods quantize the U-Net that consumes its states."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class TextEncoder(nn.Module):
  vocab_size: int
  width: int = 64
  layers: int = 2
  heads: int = 4
  max_len: int = 4

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens [B, L] int (0 = padding) → states [B, L, width]."""
    if tokens.shape[-1] != self.max_len:
      raise ValueError(f"tokens have length {tokens.shape[-1]}; this encoder takes max_len={self.max_len}")
    h = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
    h = h + self.param("position_embedding", nn.initializers.normal(0.02), (self.max_len, self.width))
    for i in range(self.layers):
      y = nn.LayerNorm(name=f"layers_{i}_norm1")(h)
      h = h + nn.MultiHeadDotProductAttention(self.heads, name=f"layers_{i}_attn")(y, y)
      y = nn.LayerNorm(name=f"layers_{i}_norm2")(h)
      y = nn.Dense(4 * self.width, name=f"layers_{i}_fc1")(y)
      h = h + nn.Dense(self.width, name=f"layers_{i}_fc2")(nn.gelu(y))
    return nn.LayerNorm(name="final_norm")(h)
