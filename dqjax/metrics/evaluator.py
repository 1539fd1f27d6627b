"""The offline evaluator: a small digit classifier trained by dqjax on the MNIST-5k train split.

It plays the role of the Inception network of the survey's metrics: its pooled features give FID and
precision/recall, the first 7 channels of an intermediate spatial map give sFID (as ADM's mixed_6/conv),
and its logits give IS and the conditional accuracy that stands in for the CLIP score."""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "zoo", "weights", "evaluator")
SPATIAL_CHANNELS = 7


class DigitClassifier(nn.Module):
  """conv32 → conv64 (↓2) → conv128 (↓2) → pool → dense128 → 10 logits, GroupNorm + SiLU."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    def block(h, ch, stride, name):
      h = nn.Conv(ch, (3, 3), strides=stride, name=f"{name}_conv")(h)
      return nn.silu(nn.GroupNorm(8, name=f"{name}_norm")(h))

    h = block(x, 32, 1, "b1")
    h = block(h, 64, 2, "b2")
    spatial = block(h, 64, 1, "b3")                       # 16×16 map: the sFID features
    h = block(spatial, 128, 2, "b4")
    h = block(h, 128, 1, "b5")
    pool = jnp.mean(h, axis=(1, 2))
    feat = nn.silu(nn.Dense(128, name="fc")(pool))
    feat = nn.Dropout(0.3, deterministic=not train)(feat)
    logits = nn.Dense(10, name="head")(feat)
    return {"pool": feat, "spatial": spatial[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1), "logits": logits}


@functools.lru_cache(maxsize=1)
def load_evaluator():
  """A jitted `features(images [N,32,32,1] in [-1,1]) -> dict(pool, spatial, logits)` (numpy, batched)."""
  from dqjax.zoo import io
  params, _ = io.load_params(WEIGHTS)
  model = DigitClassifier()
  fwd = jax.jit(lambda x: model.apply({"params": params}, x))

  def features(images, batch: int = 500):
    images = np.asarray(images, np.float32)
    outs = [jax.tree_util.tree_map(np.asarray, fwd(jnp.asarray(images[i:i + batch])))
            for i in range(0, images.shape[0], batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  return features


@functools.lru_cache(maxsize=1)
def reference():
  """Features of the real data: train split (FID/sFID statistics) and a fixed 1,000-image subset (P/R)."""
  from dqjax.data import mnist
  from dqjax.metrics.fid import statistics
  x, y = mnist.load_mnist("train")
  f = load_evaluator()(x)
  sub = np.random.default_rng(0).choice(len(x), 1000, replace=False)
  return {"pool_stats": statistics(f["pool"]), "spatial_stats": statistics(f["spatial"]),
          "pool_subset": f["pool"][sub]}
