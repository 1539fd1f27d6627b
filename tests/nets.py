"""Tiny Flax nets for core tests: they follow the denoiser convention model(x, t, cond)."""
import flax.linen as nn
import jax.numpy as jnp


class MatMul(nn.Module):
  equation: str

  @nn.compact
  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)


class TinyNet(nn.Module):
  """conv -> conv (time-conditioned) -> token attention -> dense head."""
  features: int = 8

  @nn.compact
  def __call__(self, x, t, cond=None):
    h = nn.Conv(self.features, (3, 3), name="conv_in")(x)
    temb = nn.Dense(self.features, name="time_dense")(jnp.sin(jnp.asarray(t, jnp.float32)[:, None] / 100.0
                                                             * jnp.arange(1, 5)))
    h = nn.silu(h + temb[:, None, None, :])
    h = nn.Conv(self.features, (3, 3), name="conv_mid")(h)
    b, hh, ww, c = h.shape
    tok = h.reshape(b, hh * ww, c)
    q = nn.Dense(c, name="to_q")(tok)
    k = nn.Dense(c, name="to_k")(tok)
    v = nn.Dense(c, name="to_v")(tok)
    s = MatMul("bqd,bkd->bqk", name="qk_matmul")(q, k) / jnp.sqrt(c)
    p = nn.softmax(s, axis=-1)
    o = MatMul("bqk,bkd->bqd", name="sv_matmul")(p, v)
    h = h + o.reshape(b, hh, ww, c)
    return nn.Conv(x.shape[-1], (3, 3), name="conv_out")(nn.silu(h))
