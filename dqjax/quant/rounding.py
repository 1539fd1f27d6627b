"""AdaRound (Nagel et al., 2020), as BRECQ / Q-Diffusion use it: learn, per weight, whether to round up.

The soft offset h(V) = clip(σ(V)(ζ−γ) + γ, 0, 1) (a rectified sigmoid, ζ=1.1, γ=−0.1) is added to
floor(W/s); the regulariser Σ(1 − |2h − 1|^β) with β annealed 20 → 2 pushes h to {0, 1}; after
optimisation rounding is hard: h = 1[V ≥ 0].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jax.Array, zeta: float = ZETA, gamma: float = GAMMA) -> jax.Array:
  return jnp.clip(jax.nn.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def adaround_init(w: jax.Array, qp: qops.QParams, spec: QuantSpec) -> jax.Array:
  """V such that h(V) equals the fractional part of w/s: the soft-quantized weight starts at w."""
  wg = qops.group_view(w, spec)
  frac = wg / qp.scale - jnp.floor(wg / qp.scale)
  frac = jnp.clip(frac, 0.01, 0.99)
  v = -jnp.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
  return qops.ungroup_view(v, spec, w.shape)


def adaround_offset(v: jax.Array, hard: bool) -> jax.Array:
  return (v >= 0).astype(v.dtype) if hard else rectified_sigmoid(v)


def adaround_regularizer(v: jax.Array, beta) -> jax.Array:
  h = rectified_sigmoid(v)
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)


def beta_schedule(step, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
  """β: constant `start` during warm-up, then linear to `end`."""
  w = warmup * total
  frac = jnp.clip((step - w) / jnp.maximum(total - w, 1.0), 0.0, 1.0)
  return start + (end - start) * frac


def round_loss_weight(step, total: int, warmup: float = 0.2, lam: float = 0.01):
  """λ after warm-up, 0 during it (BRECQ's schedule)."""
  return jnp.where(step < warmup * total, 0.0, lam)
