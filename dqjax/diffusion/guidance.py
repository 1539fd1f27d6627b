"""Classifier-free guidance as a wrapper around any `denoise(x, t, cond)` function.

The conditional and the null-conditioned halves are evaluated in ONE network call on a concatenated batch
[cond; null], exactly the batch a quantized model sees at inference, so calibration data and
timestep-table lookups stay consistent with what the guided sampler runs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _broadcast_null(null_cond: Any, cond: Any, batch: int) -> Any:
  """`null_cond` as a batch of `batch` entries shaped like `cond` (a scalar, one example or a batch)."""

  def one(n, c):
    n, c = jnp.asarray(n), jnp.asarray(c)
    if n.ndim == c.ndim and n.shape[0] == batch:
      return n.astype(c.dtype)
    if n.ndim == c.ndim and n.shape[0] == 1:
      return jnp.broadcast_to(n, (batch,) + n.shape[1:]).astype(c.dtype)
    if n.ndim == c.ndim - 1:
      return jnp.broadcast_to(n[None], (batch,) + n.shape).astype(c.dtype)
    raise ValueError(f"null_cond has shape {n.shape}, which does not broadcast to the conditioning's shape "
                     f"{c.shape}; pass one example (shape {c.shape[1:]} or (1,) + that) or a batch of {batch}")

  return jax.tree_util.tree_map(one, null_cond, cond)


def classifier_free_guidance(denoise_fn: Callable, guidance_scale: float, null_cond: Any) -> Callable:
  """A `denoise(x, t, cond)` returning ε_u + s (ε_c − ε_u), evaluated as one batch [x; x] with [cond; null].

  `null_cond`: the unconditional input — the null class index `num_classes` for label models (a scalar),
  the empty-prompt encoder states for text models (one example [L, D] or [1, L, D]), or a full batch.
  If the model also outputs learned-sigma channels (2C outputs for C input channels), only the first C
  channels are guided; the remaining channels are the conditional half's, as diffusers' DiT pipeline does.
  `guidance_scale` = 1 still evaluates both halves (returns ε_c up to rounding).
  """
  scale = float(guidance_scale)

  def guided(x, t, cond):
    if cond is None:
      raise ValueError("classifier-free guidance needs a conditioning `cond`; got None")
    b, c = x.shape[0], x.shape[-1]
    null = _broadcast_null(null_cond, cond, b)
    both = jax.tree_util.tree_map(lambda a, n: jnp.concatenate([jnp.asarray(a), n], 0), cond, null)
    tt = jnp.broadcast_to(jnp.asarray(t), (b,))
    out = denoise_fn(jnp.concatenate([x, x], 0), jnp.concatenate([tt, tt], 0), both)
    out_c, out_u = out[:b], out[b:]
    eps = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
    if out.shape[-1] == c:
      return eps
    return jnp.concatenate([eps, out_c[..., c:]], axis=-1)

  return guided
