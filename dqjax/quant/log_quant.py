"""A log2 (power-of-two) quantizer for attention probabilities (DGQ's prompt-specific log quantization).

Softmax outputs span many orders of magnitude, so a uniform grid wastes its levels near the maximum and
rounds the many small probabilities to zero. The log2 grid keeps Δ·2^(−q), q = 0 … 2^b − 1:

    q = clip(round(−log2(x / Δ)), 0, 2^b − 1),   x̂ = Δ · 2^(−q)

Δ is either calibrated (the best of a few high percentiles of the data, by L2 error, as DGQ's
`T2ILogQuantizer` does) or taken from the tensor itself at run time ("real time": Δ = max x of the current
prompt). Zeros and negatives map to the smallest level (Δ·2^(−(2^b−1))), as in the reference code.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

PERCENTILES = (0.999, 0.9999, 0.99999)


def log2_codes(x: jax.Array, delta, bits: int) -> jax.Array:
  """Integer exponents q in [0, 2^bits − 1] (float32 array)."""
  if not 1 <= int(bits) <= 8:
    raise ValueError(f"log2 quantizer bits={bits!r} is out of range; accepted values: 1..8")
  top = float(2 ** int(bits) - 1)
  ratio = jnp.maximum(x / delta, 1e-30)
  return jnp.clip(jnp.round(-jnp.log2(ratio)), 0.0, top)


def log2_fake_quant(x: jax.Array, delta, bits: int) -> jax.Array:
  """Δ·2^(−q): forward the log2-quantized value, straight-through gradient to x."""
  q = log2_codes(x, delta, bits)
  out = delta * jnp.exp2(-q)
  return x + jax.lax.stop_gradient(out.astype(x.dtype) - x)


def realtime_delta(x: jax.Array, batch_axis: int = 0) -> jax.Array:
  """Δ = max of each example (every axis but the batch axis), shaped to broadcast against x."""
  axes = tuple(i for i in range(x.ndim) if i != batch_axis % x.ndim)
  return jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 1e-12))


def search_delta(x: jax.Array, bits: int, percentiles: Sequence[float] = PERCENTILES) -> jax.Array:
  """The Δ among the given percentiles of x (and its max) with the smallest L2 quantization error."""
  flat = x.reshape(-1).astype(jnp.float32)
  cands = jnp.concatenate([jnp.quantile(flat, jnp.asarray(percentiles, jnp.float32)), jnp.max(flat)[None]])
  cands = jnp.maximum(cands, 1e-12)
  err = jax.vmap(lambda d: jnp.sum((log2_fake_quant(flat, d, bits) - flat) ** 2))(cands)
  return cands[jnp.argmin(err)]
