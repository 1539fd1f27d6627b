"""A tiny diffusers-structured DiT (class-conditional, CFG-paired calibration batches) for the DiT PTQ tests.

Its adaLN-produced activations get deliberate channel outliers (a few large shift biases), the situation
every channel-balancing method is designed for.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dqjax import models
from dqjax.calib.data import CalibData
from tests.nets import numpy_params

NUM_CLASSES = 3
TINY = models.DiTConfig(sample_size=4, in_channels=4, out_channels=4, patch_size=2, num_layers=1,
                        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=NUM_CLASSES,
                        norm_eps=1e-6)
D = TINY.inner_dim   # 16


def _with_outliers(params, scale: float = 8.0):
  """Channel outliers in the modulated inputs of qkv and fc1 (adaLN shift biases) and in fc2's weights."""
  params = jax.tree_util.tree_map(lambda a: a, params)
  for i in range(TINY.num_layers):
    lin = params[f"transformer_blocks_{i}"]["norm1"]["linear"]
    b = np.asarray(lin["bias"]).copy()
    for chunk in (0, 3):               # shift_msa, shift_mlp
      b[chunk * D + 1] += scale
      b[chunk * D + 5] -= 0.5 * scale
    lin["bias"] = jnp.asarray(b)
  return params


@functools.lru_cache(maxsize=None)
def tiny_dit(seed: int = 0, outliers: bool = True):
  model = models.DiTTransformer2DModel(TINY)
  x = jnp.zeros((2, 4, 4, 4))
  t = jnp.full((2,), 500.0)
  c = jnp.arange(2) % NUM_CLASSES
  params = numpy_params(model, x, t, c, seed=seed)
  if outliers:
    params = _with_outliers(params)
  return model, params, (x, t, c)


def calib(steps: int = 4, n: int = 8, seed: int = 0) -> CalibData:
  """CFG-shaped calibration data: every step's batch is [x; x] with labels [c; null], the spread shrinking
  along the trajectory (numpy draws: a jax.random draw compiles for seconds per shape)."""
  h = n // 2
  x = np.random.default_rng(seed).standard_normal((steps, h, 4, 4, 4)).astype(np.float32)
  x *= (1.0 + 0.5 * np.arange(steps, dtype=np.float32))[::-1, None, None, None, None]
  labels = np.concatenate([np.arange(h) % NUM_CLASSES, np.full((h,), NUM_CLASSES)])
  conds = np.broadcast_to(labels, (steps, n)).astype(np.int32)
  ts = np.linspace(900.0, 100.0, steps).round().astype(np.float32)
  return CalibData(*jax.device_put((np.concatenate([x, x], axis=1), ts, conds, np.arange(steps))))


def fp_out(model, params, data: CalibData, step: int = 0):
  x, t, c = data.xs[step], jnp.full((data.num_samples,), data.ts[step]), data.conds[step]
  return jax.jit(model.apply)({"params": params}, x, t, c)     # one compile; eager is many small ones
