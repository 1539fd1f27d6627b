"""A tiny diffusers-structured U-Net and trajectory-like calibration data for the U-Net PTQ method tests."""
import jax
import jax.numpy as jnp

from dqjax import models
from dqjax.calib.data import CalibData

TINY = models.UNet2DConfig(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                           norm_num_groups=4)


def tiny_unet(seed: int = 0):
  model = models.UNet2DModel(TINY)
  x = jnp.zeros((2, 8, 8, 2))
  t = jnp.full((2,), 500.0)
  params = jax.jit(model.init)(jax.random.key(seed), x, t)["params"]   # jitted: eager init is slow
  return model, params, (x, t, None)


def trajectory(steps: int = 8, n: int = 8, seed: int = 0, growth: float = 0.5):
  """Step-major inputs whose spread changes with the step (as x_t does along a reverse trajectory)."""
  xs = jax.random.normal(jax.random.key(seed), (steps, n, 8, 8, 2))
  xs = xs * (1.0 + growth * jnp.arange(steps))[::-1, None, None, None, None]
  ts = jnp.linspace(950.0, 50.0, steps).round()
  return CalibData(xs, ts, None, jnp.arange(steps))
