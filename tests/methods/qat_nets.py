"""Shared tiny setups for the QAT / LoRA / ultra-low-bit method tests (tests/methods/test_{efficientdm,...}.py)."""
import jax.numpy as jnp
import ml_collections

from dqjax.diffusion import samplers, schedules
from dqjax.methods import recipe
from tests.nets import TinyNet, numpy_params

ENV = recipe.DiffusionEnv(schedules.make_schedule("linear", 1000),
                          samplers.SamplerConfig("ddim", 4, clip_sample=True), (8, 8, 1))
X = jnp.zeros((2, 8, 8, 1))
T = jnp.full((2,), 10.0)


def tiny():
  """(model, params) of the conv / time-dense / attention TinyNet."""
  model = TinyNet()
  return model, numpy_params(model, X, T, seed=1)


def config(**fields):
  """A method config with CPU-test sizes (a handful of steps, a pool of 8 trajectories)."""
  base = dict(steps=6, pool_size=8, batch_size=4, progress=False, log_every=1)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def run(name, w_bits, a_bits, **fields):
  model, params = tiny()
  rec = recipe.build(name, config(**fields))
  return rec(model, params, (X, T), None, w_bits=w_bits, a_bits=a_bits, env=ENV)
