"""Noise schedules (β_t) and the conversions between a model's output, ε, v and x₀.

The schedule is a pytree of arrays (so it can be passed through `jax.jit`) with its prediction type and
length as static fields. β schedules follow diffusers' definitions and dtypes (float32 β, float32 cumulative
product) so that samplers built on them match diffusers' schedulers step for step.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")


@struct.dataclass
class NoiseSchedule:
  """β_t, α_t = 1 − β_t and ᾱ_t = ∏ α_s for the training timesteps t = 0..T−1 (arrays [T])."""
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)


def _check_prediction(prediction_type: str) -> None:
  if prediction_type not in PREDICTIONS:
    raise ValueError(f"prediction_type={prediction_type!r} is unknown; accepted values: {', '.join(PREDICTIONS)}")


def schedule_from_betas(betas, prediction_type: str = "epsilon") -> NoiseSchedule:
  """A schedule from explicit β values (diffusers' `trained_betas`)."""
  _check_prediction(prediction_type)
  b = np.asarray(betas, np.float32)
  if b.ndim != 1 or b.shape[0] < 2:
    raise ValueError(f"betas must be a 1-D array of at least 2 values; got shape {b.shape}")
  if not np.all((b > 0) & (b < 1)):
    raise ValueError("betas must all lie in the open interval (0, 1)")
  alphas = (np.float32(1.0) - b).astype(np.float32)
  # torch.cumprod accumulates float32 inputs in float64 on the CPU: do the same so that ᾱ matches diffusers
  # bit for bit (a float32 running product drifts by ~1e-6 relative, visible where ᾱ ≈ 0 for 'cosine')
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  return NoiseSchedule(jnp.asarray(b), jnp.asarray(alphas), jnp.asarray(alphas_cumprod), prediction_type,
                       int(b.shape[0]))


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(start, end, n, dtype=float32)` exactly: float32 step, fused multiply-add from the start
  for the first half and from the end for the second half (so diffusers' β match bit for bit)."""
  a, b = np.float32(start), np.float32(end)
  step = (b - a) / np.float32(n - 1)
  i = np.arange(n, dtype=np.float64)
  lo = (np.float64(a) + np.float64(step) * i).astype(np.float32)
  hi = (np.float64(b) - np.float64(step) * (n - 1 - i)).astype(np.float32)
  return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def make_schedule(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, prediction_type: str = "epsilon") -> NoiseSchedule:
  """β schedules as diffusers defines them.

  kind: 'linear' (β linear from beta_start to beta_end), 'scaled_linear' (√β linear; the LDM/Stable
    Diffusion schedule) or 'cosine' (diffusers' 'squaredcos_cap_v2', Nichol & Dhariwal; beta_start/end
    are ignored, β capped at 0.999).
  """
  if kind not in SCHEDULES:
    raise ValueError(f"schedule kind={kind!r} is unknown; accepted values: {', '.join(SCHEDULES)}")
  _check_prediction(prediction_type)
  if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an integer ≥ 2")
  n = int(num_train_timesteps)
  if kind != "cosine":
    if not 0 < beta_start <= beta_end < 1:
      raise ValueError(f"beta_start={beta_start!r} and beta_end={beta_end!r} must satisfy "
                       "0 < beta_start ≤ beta_end < 1")
  if kind == "linear":
    betas = _torch_linspace_f32(beta_start, beta_end, n)
  elif kind == "scaled_linear":
    betas = _torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, n) ** 2
  else:
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float64)
  return schedule_from_betas(betas.astype(np.float32), prediction_type)


def _bcast(a, like):
  """A per-example value [B] (or a scalar) shaped to broadcast against `like` [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


def alpha_bar_at(schedule: NoiseSchedule, t) -> jax.Array:
  """ᾱ_t for integer (or integral float) timesteps t (any shape)."""
  return schedule.alphas_cumprod[jnp.asarray(t).astype(jnp.int32)]


def q_sample(schedule: NoiseSchedule, x0, t, noise):
  """Forward process: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, for timesteps t [B] (or a scalar)."""
  ab = _bcast(alpha_bar_at(schedule, t), x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def training_target(schedule: NoiseSchedule, x0, t, noise):
  """What the network is trained to output: ε, or v = √ᾱ ε − √(1−ᾱ) x₀ for v-prediction."""
  if schedule.prediction_type == "epsilon":
    return noise
  ab = _bcast(alpha_bar_at(schedule, t), x0)
  return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0


def eps_and_x0(schedule: NoiseSchedule, output, x_t, alpha_bar):
  """(ε, x₀) from a model output (ε or v) at x_t with cumulative alpha `alpha_bar` (scalar or [B]).

  Both are computed directly from the output, as diffusers does (for v-prediction x₀ = √ᾱ x − √(1−ᾱ) v
  without dividing by √ᾱ, which would amplify float error at the noisiest steps).
  """
  ab = _bcast(alpha_bar, x_t)
  a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  if schedule.prediction_type == "epsilon":
    return output, (x_t - s * output) / a
  return a * output + s * x_t, a * x_t - s * output


def eps_from_output(schedule: NoiseSchedule, output, x_t, alpha_bar):
  """ε from the model output (identity for ε-prediction)."""
  return eps_and_x0(schedule, output, x_t, alpha_bar)[0]


def x0_from_output(schedule: NoiseSchedule, output, x_t, alpha_bar):
  """The predicted clean sample x₀ from the model output."""
  return eps_and_x0(schedule, output, x_t, alpha_bar)[1]


def x0_from_eps(x_t, eps, alpha_bar):
  """x₀ = (x_t − √(1−ᾱ) ε) / √ᾱ."""
  ab = _bcast(alpha_bar, x_t)
  return (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def snr(schedule: NoiseSchedule, t: Optional[jax.Array] = None) -> jax.Array:
  """Signal-to-noise ratio ᾱ/(1−ᾱ) at t (all training timesteps if t is None)."""
  ab = schedule.alphas_cumprod if t is None else alpha_bar_at(schedule, t)
  return ab / (1.0 - ab)
