"""The ε-statistics collector: quantization noise Δ = ε_q − ε_fp along FP sampling trajectories.

The sampler-side error-correction methods (PTQD, D²-DPM, TaC-QDM, QNCD) all start from the same
measurement: run the FP sampler, feed the *same* x_t to the float and to the quantized denoiser at every
model call, and summarise the difference of their (guided) noise predictions per sampler step. They then
differ only in which statistic they fit:

  PTQD      Δ = k_t ε + b_t[c] + r: the regression slope k_t of Δ on ε_fp, the residual mean per channel,
            the residual variance (absorbed into the sampler's noise);
  D²-DPM    a joint Gaussian of (ε_q, Δ) per step (and channel), outliers beyond 4σ removed;
  TaC-QDM   a channel-wise least-squares rescaling of ε_q on a masked, relative-error-weighted loss, and the
            bias of the quantized trajectory's *inputs* x̂_t against the FP ones (paired runs);
  QNCD      the mean noise of the quantized model on re-noised states (runtime estimation, done offline);
  PCR/PTQD  per-step sensitivity (SNR of ε against Δ) for mixed / relaxed activation precision.

Everything is step-major ([S, N, ...], S = sampler model calls, N = samples) so every statistic is a pure
jnp function vmapped over steps, and collection is one jitted `lax.map` over the steps. `eps_coefficients`
gives, for each call, the factor with which that call's ε enters the next state — the unit that turns an
ε-space variance into the sampler's `noise_var_delta` and an input bias into an ε shift.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


# --- data --------------------------------------------------------------------------------------------
@struct.dataclass
class EpsPairs:
  """Float and quantized noise predictions at identical inputs, step-major.

  xs: [S, N, ...] the FP trajectory's model inputs; ts: [S] model timesteps; alpha_bar: [S] ᾱ at each call;
  coef: [S] dx_next/dε of each call (see `eps_coefficients`); eps_fp / eps_q: [S, N, ...] the guided ε
  (v-models converted) of the float and the quantized model at xs; x_final: [N, ...] the FP sample.
  """
  xs: Array
  ts: Array
  alpha_bar: Array
  coef: Array
  eps_fp: Array
  eps_q: Array
  x_final: Optional[Array] = None

  @property
  def delta(self) -> Array:
    return self.eps_q - self.eps_fp

  @property
  def num_steps(self) -> int:
    return int(self.xs.shape[0])


# --- sampling with the recipe's environment -----------------------------------------------------------------
def _require_env(qm):
  if qm.env is None:
    raise ValueError("the ε statistics need the recipe's DiffusionEnv (qm.env: schedule, sampler, sample "
                     "shape); pass env= to the recipe (the bench and zoo do)")
  return qm.env


def guided(qm, denoise: Callable, conds) -> Callable:
  """`denoise` with classifier-free guidance exactly as the sampler run by the zoo/bench applies it: the
  sampler config's own `guidance_scale` if set, else the env's; unconditional models are left alone."""
  env = _require_env(qm)
  scale = float(getattr(env.sampler, "guidance_scale", 1.0))
  if scale == 1.0:
    scale = float(env.guidance_scale)
  if conds is None or env.null_cond is None or scale == 1.0:
    return denoise
  from dqjax.diffusion import guidance
  return guidance.classifier_free_guidance(denoise, scale, env.null_cond)


def _plain_sampler(cfg):
  """The sampler config without in-sampler guidance (`guided` applies it instead, identically)."""
  import dataclasses
  return cfg if float(getattr(cfg, "guidance_scale", 1.0)) == 1.0 else dataclasses.replace(cfg, guidance_scale=1.0)


def initial_state(qm, num_samples: int, seed: int):
  """(x_T, conds, sampler key) for `num_samples` fresh samples; deterministic in `seed`."""
  env = _require_env(qm)
  k_noise, k_cond, k_run = jax.random.split(jax.random.key(int(seed) + 104729), 3)
  x = jax.random.normal(k_noise, (num_samples,) + tuple(env.sample_shape))
  conds = None if env.cond_sampler is None else env.cond_sampler(k_cond, num_samples)
  return x, conds, k_run


def sample_fn(qm, denoise: Callable, *, correction: Optional[Callable] = None) -> Callable:
  """Jitted `(x_T, conds, key) -> SampleOutput` (with trajectory) of the env's sampler on `denoise`."""
  env = _require_env(qm)
  from dqjax.diffusion import samplers
  cfg = _plain_sampler(env.sampler)

  @jax.jit
  def run(x, conds, key):
    return samplers.sample(guided(qm, denoise, conds), env.schedule, cfg, x, key, conds, correction=correction,
                           return_trajectory=True)

  return run


def eps_fn(qm, denoise: Callable) -> Callable:
  """Jitted `(xs [S, N, ...], ts [S], conds) -> ε [S, N, ...]`: the guided noise prediction (ε, v-models
  converted) at every trajectory input, one `lax.map` over steps."""
  env = _require_env(qm)
  from dqjax.diffusion import schedules
  ac = jnp.asarray(env.schedule.alphas_cumprod, jnp.float32)

  @jax.jit
  def run(xs, ts, conds):
    g = guided(qm, denoise, conds)

    def one(a):
      x, t = a
      out = g(x, jnp.full((x.shape[0],), t, jnp.float32), conds)[..., :x.shape[-1]]
      ab = ac[jnp.clip(jnp.round(t).astype(jnp.int32), 0, ac.shape[0] - 1)]
      return schedules.eps_from_output(env.schedule, out, x, ab)

    return jax.lax.map(one, (xs, jnp.asarray(ts, jnp.float32)))

  return run


def eps_coefficients(schedule, sampler_cfg) -> np.ndarray:
  """[S]: how much the next state moves per unit of this call's ε, d x_{i+1} / d ε_i (x_{S} = the sample).

  Exact for every sampler (forward-mode derivative of the sampler itself with a zero denoiser, whose
  updates are affine in ε): DDIM gives √(1−ᾱ'−σ²) − √(ᾱ'(1−ᾱ)/ᾱ), DDPM −c_x0·√(1−ᾱ)/√ᾱ, PLMS and
  DPM-Solver++ their multistep weights. A variance v measured on ε becomes `noise_var_delta` c_i²·v; an
  input bias b of call i+1 is removed by shifting ε_i by −b/c_i.
  """
  from dqjax.diffusion import samplers
  sampler_cfg = _plain_sampler(sampler_cfg)        # the coefficient does not depend on guidance
  n = len(samplers.timesteps_for(schedule, sampler_cfg))

  def run(a):
    corr = lambda eps, info: (eps + a[info.index], jnp.float32(0.0))
    out = samplers.sample(lambda x, t, c: jnp.zeros_like(x), schedule, sampler_cfg, jnp.zeros((1, 1)),
                          jax.random.key(0), None, correction=corr, return_trajectory=True)
    return jnp.concatenate([out.trajectory.xs[1:, 0, 0], out.x0[0]])

  jac = jax.jit(jax.jacfwd(run))(jnp.zeros((n,), jnp.float32))
  return np.asarray(jnp.diagonal(jac), np.float32)


def collect(qm, num_samples: int = 64, *, seed: Optional[int] = None, denoise_q: Optional[Callable] = None,
            denoise_fp: Optional[Callable] = None) -> EpsPairs:
  """Run the FP sampler on `num_samples` fresh noises and evaluate the quantized denoiser at every input.

  denoise_q: the quantized denoiser (default `qm.denoiser()`); denoise_fp: the float one (default: the
  model with `qm.fp_params`). Same seed → bit-identical pairs.
  """
  env = _require_env(qm)
  seed = env.seed if seed is None else seed
  denoise_fp = denoise_fp or qm.denoiser("fp")
  denoise_q = denoise_q or qm.denoiser()
  x, conds, key = initial_state(qm, num_samples, seed)
  fp = sample_fn(qm, denoise_fp)(x, conds, key)
  xs, ts = fp.trajectory.xs, fp.trajectory.ts
  eps_q = eps_fn(qm, denoise_q)(xs, ts, conds)
  ac = jnp.asarray(env.schedule.alphas_cumprod, jnp.float32)
  coef = jnp.asarray(eps_coefficients(env.schedule, env.sampler))
  return EpsPairs(xs, ts, ac[jnp.asarray(ts).astype(jnp.int32)], coef, fp.trajectory.outputs, eps_q, fp.x0)


# --- statistics (pure, per step) ------------------------------------------------------------------------------
def _per_step(fn):
  return jax.jit(jax.vmap(fn))


def regression_slope(eps_fp: Array, delta: Array) -> Array:
  """[S]: slope k_t of the least-squares fit Δ ≈ k ε_fp + c_channel per step, pooled over samples and
  elements. PTQD fits one intercept (linregress of flatten(Δ) on flatten(ε_fp)); here each channel (last
  axis) gets its own intercept, matching the per-channel bias the correction removes, so that a channel
  offset of Δ cannot leak into k when channel means of ε differ. Same slope when they do not."""
  def one(e, d):
    axes = tuple(range(e.ndim - 1))
    ec, dc = e - e.mean(axis=axes), d - d.mean(axis=axes)
    return jnp.sum(ec * dc) / jnp.maximum(jnp.sum(ec * ec), 1e-20)
  return _per_step(one)(eps_fp, delta)


def residual_stats(eps_fp: Array, delta: Array, k: Array, *, per_channel: bool = True):
  """(mean [S, C] or [S], variance [S]) of the residual r = Δ − k ε_fp per step.

  The mean is taken per channel (over samples and positions) when `per_channel`, the variance is that of
  r minus its mean, pooled over the step."""
  def one(e, d, kk):
    r = d - kk * e
    axes = tuple(range(r.ndim - 1)) if per_channel else tuple(range(r.ndim))
    m = jnp.mean(r, axis=axes)
    return m, jnp.mean((r - m) ** 2)
  return _per_step(one)(eps_fp, delta, k)


def snr(eps_fp: Array, delta: Array) -> Array:
  """[S]: ‖ε_fp‖² / ‖Δ‖² per step (PTQD's SNR of the quantized noise prediction)."""
  def one(e, d):
    return jnp.sum(e * e) / jnp.maximum(jnp.sum(d * d), 1e-20)
  return _per_step(one)(eps_fp, delta)


def relative_error(eps_fp: Array, delta: Array) -> Array:
  """[S]: ‖Δ‖² / ‖ε_fp‖² per step (the per-step sensitivity, 1/SNR)."""
  return 1.0 / snr(eps_fp, delta)


def joint_gaussian(x: Array, y: Array, *, per_channel: bool = False, outlier_std: float = 4.0):
  """Per step (and channel) Gaussian fit of the pair (X, Y): (mean [S, (C,) 2], cov [S, (C,) 2, 2]).

  Elements whose Y lies more than `outlier_std` standard deviations from Y's mean are dropped first (D²-DPM
  removes |Δ − mean| > 4σ before fitting); the covariance uses the unbiased (n − 1) normalisation, as
  numpy's cov does."""
  def fit(xv, yv):
    mu_y0 = jnp.mean(yv)
    sd_y0 = jnp.std(yv)
    w = (jnp.abs(yv - mu_y0) <= outlier_std * sd_y0).astype(jnp.float32) if outlier_std else jnp.ones_like(yv)
    n = jnp.maximum(jnp.sum(w), 2.0)
    mx, my = jnp.sum(w * xv) / n, jnp.sum(w * yv) / n
    dx, dy = xv - mx, yv - my
    cxx = jnp.sum(w * dx * dx) / (n - 1)
    cyy = jnp.sum(w * dy * dy) / (n - 1)
    cxy = jnp.sum(w * dx * dy) / (n - 1)
    return jnp.stack([mx, my]), jnp.array([[cxx, cxy], [cxy, cyy]])

  def one(xs, ys):
    if not per_channel:
      return fit(xs.reshape(-1), ys.reshape(-1))
    c = xs.shape[-1]
    return jax.vmap(fit)(xs.reshape(-1, c).T, ys.reshape(-1, c).T)

  return _per_step(one)(x, y)


def conditional_gaussian(mean: Array, cov: Array, *, rho_max: float = 0.9999):
  """For a fitted (X, Y) Gaussian: (β, μ_Y − β μ_X, σ²_{Y|X}) with β = ρ σ_Y / σ_X, ρ clipped to ±rho_max,
  so that E[Y | X] = β X + (μ_Y − β μ_X) and Var[Y | X] = σ_Y² (1 − ρ²) (D²-DPM's conditional noise)."""
  sx = jnp.sqrt(jnp.maximum(cov[..., 0, 0], 1e-20))
  sy = jnp.sqrt(jnp.maximum(cov[..., 1, 1], 0.0))
  rho = jnp.clip(cov[..., 0, 1] / jnp.maximum(sx * sy, 1e-20), -rho_max, rho_max)
  beta = rho * sy / sx
  return beta, mean[..., 1] - beta * mean[..., 0], sy ** 2 * (1.0 - rho ** 2)


def masked_channel_scale(eps_q: Array, eps_fp: Array, *, keep: float = 0.5, eps: float = 1e-3) -> Array:
  """[S, C]: the per-step, per-channel K minimising Σ_mask (K ε_q − ε_fp)² (closed form Σ ε_q ε_fp / Σ ε_q²)
  over the elements with the largest relative distortion |ε_q − ε_fp| / (|ε_fp| + eps) — the `keep` fraction
  of each step's elements (TaC-QDM's masked, relative-distortion-weighted noise reconstruction)."""
  def one(q, f):
    rel = jnp.abs(q - f) / (jnp.abs(f) + eps)
    thr = jnp.quantile(rel.reshape(-1), 1.0 - keep)
    w = (rel >= thr).astype(jnp.float32)
    axes = tuple(range(q.ndim - 1))
    num = jnp.sum(w * q * f, axis=axes)
    den = jnp.sum(w * q * q, axis=axes)
    return jnp.where(den > 1e-12, num / jnp.maximum(den, 1e-12), 1.0)
  return _per_step(one)(eps_q, eps_fp)


def channel_mean(a: Array) -> Array:
  """[S, C]: per-step mean over samples and positions (an input or output bias per channel)."""
  return jax.jit(lambda v: jnp.mean(v, axis=tuple(range(1, v.ndim - 1))))(a)


def step_entry(ts: Array, info) -> Array:
  """The table entry of a sampler call: its call index when the table's timestep matches, else the entry
  with the nearest timestep (so a table calibrated for one step count still serves another)."""
  ts = jnp.asarray(ts)
  i = jnp.clip(jnp.asarray(info.index, jnp.int32), 0, ts.shape[0] - 1)
  near = jnp.argmin(jnp.abs(ts - info.t)).astype(jnp.int32)
  return jnp.where(ts[i] == info.t, i, near)


def summary(pairs: EpsPairs) -> dict[str, Any]:
  """Per-step numbers for reports: slope k, residual std, SNR (lists of floats)."""
  k = regression_slope(pairs.eps_fp, pairs.delta)
  _, var = residual_stats(pairs.eps_fp, pairs.delta, k, per_channel=True)
  return {"t": np.asarray(pairs.ts).tolist(), "k": np.asarray(k).tolist(),
          "residual_std": np.sqrt(np.asarray(var)).tolist(), "snr": np.asarray(snr(pairs.eps_fp, pairs.delta)).tolist()}


def as_calib_data(qm, xs: Array, ts: Array, conds):
  """A trajectory's inputs as calibration data of exactly what the network saw: with classifier-free
  guidance every x appears twice, with [cond; null] (as `calib_sets.fp_trajectory` builds it)."""
  from dqjax.calib.data import from_trajectory
  env = _require_env(qm)
  scale = float(getattr(env.sampler, "guidance_scale", 1.0))
  scale = float(env.guidance_scale) if scale == 1.0 else scale
  if conds is not None and env.null_cond is not None and scale != 1.0:
    n = jax.tree_util.tree_leaves(conds)[0].shape[0]
    from dqjax.diffusion.guidance import _broadcast_null
    null = _broadcast_null(env.null_cond, conds, n)
    conds = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], 0), conds, null)
    xs = jnp.concatenate([xs, xs], axis=1)
  return from_trajectory(xs, ts, conds)
