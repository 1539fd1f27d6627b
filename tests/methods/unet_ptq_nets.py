"""A tiny diffusers-structured U-Net and trajectory-like calibration data for the U-Net PTQ method tests."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax import models
from dqjax.calib.data import CalibData
from tests.nets import numpy_params

TINY = models.UNet2DConfig(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                           norm_num_groups=4)


def tiny_unet(seed: int = 0, config: models.UNet2DConfig = TINY):
  model = models.UNet2DModel(config)
  x = jnp.zeros((2, 8, 8, 2))
  t = jnp.full((2,), 500.0)
  return model, numpy_params(model, x, t, seed=seed), (x, t, None)


def trajectory(steps: int = 8, n: int = 8, seed: int = 0, growth: float = 0.5):
  """Step-major inputs whose spread changes with the step (as x_t does along a reverse trajectory); numpy
  draws, as a jax.random draw compiles for seconds per shape."""
  xs = np.random.default_rng(seed).standard_normal((steps, n, 8, 8, 2)).astype(np.float32)
  xs *= (1.0 + growth * np.arange(steps, dtype=np.float32))[::-1, None, None, None, None]
  ts = np.linspace(950.0, 50.0, steps).round().astype(np.float32)
  return CalibData(*jax.device_put((xs, ts)), None, jax.device_put(np.arange(steps)))
