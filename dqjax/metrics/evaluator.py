"""The offline evaluator: a small digit classifier trained by dqjax on the MNIST-5k train split.

It plays the role of the FID Inception network in the survey's metrics (ADM evaluator semantics):

  pool     the 128-d feature under the head (a dense layer on the global-average-pooled last conv map), the
           analogue of Inception's pool_3: FID, P/R;
  spatial  the first 7 channels of the penultimate-resolution map (16×16), flattened to 1792-d, the analogue
           of ADM's `mixed_6/conv[..., :7]` (17×17 of Inception's 17/8 pyramid): sFID;
  logits   a linear head on `pool` (10 classes), as Inception's logits are linear in pool_3: IS and the
           conditional accuracy that stands in for the CLIP score.

Weights live in dqjax/zoo/weights/evaluator (trained by experiments/train_evaluator.py); reference
statistics of the real train split are computed once per machine and cached (see `reference`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "zoo", "weights", "evaluator")
SPATIAL_CHANNELS = 7
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)


class DigitClassifier(nn.Module):
  """conv32 → conv64 (↓2) → conv64 (sFID tap) → conv128 (↓2) → conv128 → mean pool → dense128 (FID
  features) → 10 logits, GroupNorm + SiLU."""

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


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"images must be NHWC {('N',) + IMAGE_SHAPE} in [-1, 1]; got shape {images.shape}")
  return images


@functools.lru_cache(maxsize=4)
def load_evaluator(path: str = WEIGHTS, batch_size: int = 500) -> Callable[[np.ndarray], dict]:
  """`features(images [N,32,32,1] in [-1,1]) -> {'pool': [N,128], 'spatial': [N,1792], 'logits': [N,10]}`.

  One jitted forward of a fixed batch shape (the last batch is zero-padded, so any N compiles once);
  outputs are float32 numpy arrays."""
  from dqjax.zoo import io
  params, _ = io.load_params(path)
  model = DigitClassifier()
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  params = jax.device_put(params)

  def features(images: np.ndarray) -> dict:
    images = _check_images(images)
    n = images.shape[0]
    outs = []
    for i in range(0, n, batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + IMAGE_SHAPE, np.float32)])
      out = jax.device_get(fwd(params, chunk))
      outs.append({k: np.asarray(v[:batch_size - pad]) for k, v in out.items()})
    if not outs:
      return {"pool": np.zeros((0, 128), np.float32),
              "spatial": np.zeros((0, 64 * SPATIAL_CHANNELS), np.float32),
              "logits": np.zeros((0, NUM_CLASSES), np.float32)}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  return features


REFERENCE_CACHE_ENV = "DQJAX_REFERENCE_CACHE"
REFERENCE_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dqjax", "reference")


@functools.lru_cache(maxsize=4)
def reference(path: str = WEIGHTS) -> dict:
  """Real-data reference of the metrics: FID/sFID statistics and pooled features (precision/recall) of the
  whole MNIST-5k train split (4,500 digits).

  Computed once per machine (≈ 8 s of CPU) and kept in `$DQJAX_REFERENCE_CACHE` (default
  ~/.cache/dqjax/reference; `off` disables), keyed by the hash of the evaluator weights and of the images, so
  that every process of a bench, a test run or a notebook does not recompute it; a cached file holds exactly
  the arrays a computation returns. Keys, named as in ADM's reference batches: mu, sigma (pool), mu_s,
  sigma_s (spatial), pool [4500, 128]."""
  from dqjax.data import mnist
  x, _ = mnist.load_mnist("train")
  cache = _reference_cache_path(path, x)
  if cache is not None and os.path.exists(cache):
    try:
      with np.load(cache) as f:
        return {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}
    except (OSError, ValueError, KeyError, EOFError) as e:      # corrupt or partial: recompute and rewrite
      print(f"recomputing the evaluator reference: cache {cache} is unreadable ({type(e).__name__})")
  ref = _compute_reference(path, x)
  if cache is not None:      # two processes computing it at once write the same bytes
    from dqjax import atomic
    atomic.write(cache, lambda f: np.savez(f, **ref), mode="wb")
  return ref


def _compute_reference(path: str, x: np.ndarray) -> dict:
  from dqjax.metrics.fid import statistics
  f = load_evaluator(path)(x)
  mu, sigma = statistics(f["pool"])
  mu_s, sigma_s = statistics(f["spatial"])
  return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": f["pool"]}


def _reference_cache_path(path: str, images: np.ndarray) -> str | None:
  root = os.environ.get(REFERENCE_CACHE_ENV, REFERENCE_CACHE_DIR)
  if root.strip().lower() in ("", "off", "0", "none"):
    return None
  import hashlib
  h = hashlib.sha256()
  with open(os.path.join(path, "params.safetensors"), "rb") as f:
    h.update(f.read())
  h.update(np.ascontiguousarray(images, np.float32).tobytes())
  return os.path.join(root, f"evaluator-{h.hexdigest()[:16]}.npz")

