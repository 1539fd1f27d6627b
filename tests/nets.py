"""Tiny Flax nets for core tests: they follow the denoiser convention model(x, t, cond)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def numpy_params(model: nn.Module, *args, seed: int = 0):
  """Flax's default initialisation up to truncation — kernels N(0, 1/fan_in), embeddings N(0, 1/features),
  biases 0, norm scales 1 — drawn with numpy in the shapes `model.init(key, *args)` gives.

  Why: on a cold XLA cache `model.init` compiles a threefry draw per parameter shape (8–45 s of CPU for the
  test nets), more than most tests spend on what they test."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0.0, float(np.prod(s.shape[:-1])) ** -0.5, s.shape).astype(s.dtype)
    if name == "embedding":
      return rng.normal(0.0, s.shape[-1] ** -0.5, s.shape).astype(s.dtype)
    if name in ("bias", "scale"):
      return (np.ones if name == "scale" else np.zeros)(s.shape, s.dtype)
    raise ValueError(f"numpy_params: no initialiser for parameter {jax.tree_util.keystr(path)!r}; "
                     "accepted leaf names: kernel, embedding, bias, scale")

  return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


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
