"""AdaRound (Nagel et al., 2020), as BRECQ / Q-Diffusion use it: learn, per weight, whether to round up.

The soft offset h(V) = clip(σ(V)(ζ−γ) + γ, 0, 1) (a rectified sigmoid, ζ=1.1, γ=−0.1) replaces
round-to-nearest: W_hat = s·(clip(floor(W/s) + h(V) + z, qmin, qmax) − z), i.e.
`ops.fake_quant(w, qp, spec, rounding_offset=adaround_offset(V, hard))`. The regulariser
Σ(1 − |2h − 1|^β), with β annealed 20 → 2 after a warm-up during which its weight is 0, pushes h to {0, 1};
after optimisation rounding is hard: h = 1[V ≥ 0].

V is initialised so that h(V) = frac(W/s): the soft-quantized weight starts equal to the float weight
(inside the clipping range), and the hard rounding of the initial V is round-to-nearest (h ≥ ½ ⇔ V ≥ 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jax.Array, zeta: float = ZETA, gamma: float = GAMMA) -> jax.Array:
  """h(V) = clip(σ(V)(ζ−γ) + γ, 0, 1): reaches exactly 0 and 1 at finite V, so h can settle on {0, 1}."""
  return jnp.clip(jax.nn.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: jax.Array, zeta: float = ZETA, gamma: float = GAMMA) -> jax.Array:
  """V with h(V) = h for h ∈ [0, 1]: V = log((h − γ) / (ζ − h)), finite at both ends since γ < 0 < 1 < ζ.

  (Algebraically the papers' −log((ζ−γ)/(h−γ) − 1), written as a difference of logs for accuracy.)"""
  h = jnp.clip(h, 0.0, 1.0)
  return jnp.log(h - gamma) - jnp.log(zeta - h)


def adaround_init(w: jax.Array, qp: qops.QParams, spec: QuantSpec) -> jax.Array:
  """V (same shape as w) such that h(V) equals the fractional part of w/s (group views handled).

  The zero point is an integer, so it does not change the fractional part; the clip to the grid applies
  after the offset, exactly as for round-to-nearest.
  """
  wg = qops.group_view(w, spec).astype(jnp.float32)
  u = wg / qp.scale
  frac = u - jnp.floor(u)
  return qops.ungroup_view(inverse_rectified_sigmoid(frac), spec, w.shape).astype(w.dtype)


def adaround_offset(v: jax.Array, hard: bool) -> jax.Array:
  """The rounding offset added to floor(W/s): soft h(V) while learning, hard 1[V ≥ 0] afterwards."""
  return (v >= 0).astype(v.dtype) if hard else rectified_sigmoid(v)


def adaround_regularizer(v: jax.Array, beta) -> jax.Array:
  """Σ (1 − |2h(V) − 1|^β): 0 when every h is 0 or 1, largest when h = ½. `beta` may be traced."""
  h = rectified_sigmoid(v)
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)


def beta_schedule(step, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
  """β: constant `start` during the warm-up (the first `warmup`·total steps), then linear to `end` at
  `total`. Jit-safe in `step`."""
  w = warmup * total
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - w) / max(total - w, 1.0), 0.0, 1.0)
  return start + (end - start) * frac


def round_loss_weight(step, total: int, warmup: float = 0.2, lam: float = 0.01):
  """Weight of the rounding regulariser: 0 during the warm-up, `lam` after it (BRECQ's schedule)."""
  return jnp.where(jnp.asarray(step, jnp.float32) < warmup * total, 0.0, lam)
