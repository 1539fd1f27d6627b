"""A mini denoiser with the structure the error-correction / text-image methods act on, and diffusion
environments for their tests.

`MiniUNet`: conv_in → ResBlock (time-embedding projection added before norm2, as in diffusers) → spatial
self-attention (`attn1`: q/k/v, QKᵀ, softmax·V) → optional cross-attention over text states (`attn2`) →
conv_out. Small enough that a recipe compiles in seconds, with the module paths of the real U-Nets.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqjax.diffusion import samplers, schedules
from dqjax.methods import recipe
from dqjax.models import layers
from tests.nets import numpy_params

SCHEDULE = schedules.make_schedule("linear", 1000, 1e-4, 0.02)


@dataclasses.dataclass(frozen=True)
class MiniConfig:
  channels: int = 8
  norm_num_groups: int = 4
  norm_eps: float = 1e-5
  text: bool = False


class MiniUNet(nn.Module):
  config: MiniConfig = MiniConfig()

  @nn.compact
  def __call__(self, x, t, cond=None):
    c = self.config
    temb = layers.TimestepEmbedding(4 * c.channels, name="time_embedding")(
        layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],)),
                                  c.channels, True, 0))
    h = layers.conv3x3(c.channels, "conv_in")(x)
    h = layers.ResnetBlock2D(c.channels, c.norm_num_groups, c.norm_eps, name="resnets_0")(h, temb)
    h = layers.Attention(2, c.channels // 2, group_norm=True, groups=c.norm_num_groups, eps=c.norm_eps,
                         name="attn1")(h)
    if c.text:
      b, hh, ww, ch = h.shape
      tok = h.reshape(b, hh * ww, ch)
      tok = tok + layers.Attention(2, ch // 2, qkv_bias=False, name="attn2")(tok, cond)
      h = tok.reshape(b, hh, ww, ch)
    h = nn.silu(layers.group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(h))
    return layers.conv3x3(x.shape[-1], "conv_out")(h)


def mini(seed: int = 0, text: bool = False):
  model = MiniUNet(MiniConfig(text=text))
  x = jnp.zeros((2, 8, 8, 2))
  t = jnp.full((2,), 500.0)
  c = jnp.zeros((2, 4, 8)) if text else None
  return model, numpy_params(model, x, t, c, seed=seed), (x, t, c)


def env(steps: int = 4, name: str = "ddim", eta: float = 0.0, cond_sampler=None, null=None, scale: float = 1.0,
        shape=(8, 8, 2)) -> recipe.DiffusionEnv:
  cfg = samplers.SamplerConfig(name, steps, eta=eta)
  return recipe.DiffusionEnv(SCHEDULE, cfg, shape, cond_sampler, null, scale, seed=0)


def text_env(steps: int = 4, name: str = "ddim") -> recipe.DiffusionEnv:
  """Random 'caption states' whose first token is a shared constant (like a start token), with CFG."""
  first = jax.random.normal(jax.random.key(3), (1, 8)) * 2.0

  def cond_sampler(key, n):
    rest = jax.random.normal(key, (n, 3, 8))
    return jnp.concatenate([jnp.broadcast_to(first, (n, 1, 8)), rest], axis=1)

  null = jnp.concatenate([first, jnp.zeros((3, 8))])[None]
  return env(steps, name, cond_sampler=cond_sampler, null=null, scale=2.0)


def qmodel(model, params, example, e, rules=()):
  """An uncalibrated QModel (for the statistics tests)."""
  qm = recipe.prepare(model, params, list(rules), example, warn_unused=False)
  return qm.replace(env=e)


def fp_calib(e, model, params, n: int = 8, steps=None, seed: int = 0):
  """Calibration data from the float model's own trajectories (all steps, CFG halves included)."""
  from dqjax.calib import calib_sets
  qm = recipe.QModel(model, None, params, {}, params, 1000, env=e)
  data = calib_sets.fp_trajectory(qm, n, seed=seed)
  return data if steps is None else data.select_steps(steps)
