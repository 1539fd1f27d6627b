"""Samplers in pure JAX: DDPM (ancestral), DDIM (η), PLMS (diffusers' PNDM with `skip_prk_steps`) and
DPM-Solver++(2M), each one `lax.scan` over its model calls.

A sampler takes `denoise(x, t, cond)` — the FP model, a quantized model or a guided wrapper — and passes the
model timestep to it at every step ([B] vector, equal entries), so timestep-conditioned quantization tables
are looked up inside the one compiled loop. A `correction(eps, StepInfo) -> (eps, noise_var_delta)` hook
lets the quantization methods that act on the sampler (PTQD, D²-DPM, TaC-QDM, QNCD) correct ε and the
variance of the injected noise at every step. With `return_trajectory=True` the exact network inputs, the
timesteps and the ε used are returned, so calibration data comes from the FP model's own trajectories and
FP/quantized runs can be compared step by step.

Faithfulness: step formulas, timestep spacings and float32 coefficient arithmetic follow diffusers'
DDPMScheduler, DDIMScheduler, PNDMScheduler(skip_prk_steps=True) and DPMSolverMultistepScheduler
(dpmsolver++, order 2, midpoint, final sigma 0) and are tested against them (tests/test_scheduler_parity.py).
Deliberate differences, all documented in docs/samplers.md:
- every sampler steps to the *next timestep it visits* (diffusers' DDIM/PNDM step to t − T//S, which only
  differs for 'linspace', or 'trailing' when S does not divide T), so non-uniform spacings (Q-Diffusion's
  'quad') are consistent;
- `clip_sample` also applies to DPM-Solver++ (diffusers has no such option there); PLMS rejects it;
- a learned-sigma model's variance channels are ignored (fixed variances as above).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dqjax.diffusion.guidance import classifier_free_guidance
from dqjax.diffusion.schedules import NoiseSchedule, eps_and_x0

SAMPLERS = ("ddpm", "ddim", "plms", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace", "quad")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Which sampler, how many steps and how they are spaced.

  name: 'ddpm' | 'ddim' | 'plms' | 'dpmpp_2m'.
  num_steps: S sampler steps (PLMS makes S+1 model calls: its first timestep is evaluated twice).
  eta: DDIM's η (0 = deterministic DDIM, 1 = DDPM-like variance); only 'ddim' accepts η ≠ 0.
  timestep_spacing: 'leading' | 'trailing' | 'linspace' as diffusers defines them for each scheduler, or
    'quad' as Q-Diffusion's DDIM CIFAR runs (t_i = int((i·√(0.8T)/(S−1))²), dense near t = 0).
  clip_sample: clip the predicted x₀ to [−1, 1] at every step (ddpm, ddim, dpmpp_2m; plms rejects it).
  guidance_scale: classifier-free guidance scale applied by `sample` (needs its `null_cond`); 1 = none.
  steps_offset: diffusers' `steps_offset` (added to 'leading' timesteps; Stable Diffusion uses 1).
  set_alpha_to_one: ᾱ after the last step: True → 1, False → ᾱ_0 (diffusers' `set_alpha_to_one`);
    None → the diffusers default of the scheduler (DDIM True, PNDM False). DDPM and DPM-Solver++ always end
    at ᾱ = 1 (σ = 0).
  """
  name: str = "ddim"
  num_steps: int = 20
  eta: float = 0.0
  timestep_spacing: str = "leading"
  clip_sample: bool = False
  guidance_scale: float = 1.0
  steps_offset: int = 0
  set_alpha_to_one: Optional[bool] = None

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise ValueError(f"SamplerConfig.name={self.name!r} is unknown; accepted values: {', '.join(SAMPLERS)}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"SamplerConfig.timestep_spacing={self.timestep_spacing!r} is unknown; accepted values: "
                       f"{', '.join(SPACINGS)}")
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 1:
      raise ValueError(f"SamplerConfig.num_steps={self.num_steps!r} must be a positive integer")
    if not np.isfinite(self.eta) or self.eta < 0:
      raise ValueError(f"SamplerConfig.eta={self.eta!r} must be a finite number ≥ 0")
    if self.eta != 0 and self.name != "ddim":
      raise ValueError(f"SamplerConfig.eta={self.eta!r} only applies to name='ddim'; use eta=0.0 with "
                       f"name={self.name!r}")
    if not np.isfinite(self.guidance_scale):
      raise ValueError(f"SamplerConfig.guidance_scale={self.guidance_scale!r} must be finite")
    if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, (int, np.integer)) \
        or self.steps_offset < 0:
      raise ValueError(f"SamplerConfig.steps_offset={self.steps_offset!r} must be an integer ≥ 0")
    if self.set_alpha_to_one not in (None, True, False):
      raise ValueError(f"SamplerConfig.set_alpha_to_one={self.set_alpha_to_one!r}; accepted values: None, "
                       "True, False")
    if self.clip_sample and self.name == "plms":
      raise ValueError("SamplerConfig.clip_sample=True is not supported by name='plms' (PLMS never forms x0); "
                       "accepted: clip_sample=False")
    if self.set_alpha_to_one is False and self.name in ("ddpm", "dpmpp_2m"):
      raise ValueError(f"SamplerConfig.set_alpha_to_one=False is not supported by name={self.name!r} "
                       "(it always ends at alpha_bar = 1); accepted: None or True")

  @property
  def final_alpha_one(self) -> bool:
    if self.set_alpha_to_one is None:
      return self.name != "plms"
    return self.set_alpha_to_one


class StepInfo(NamedTuple):
  """What a sampler correction sees at one model call (all inside the compiled loop)."""
  x: jax.Array            # the model input x_t [B, ...]
  t: jax.Array            # the model timestep (float32 scalar)
  index: jax.Array        # model-call index (int32 scalar), 0 = first (noisiest); PLMS has S+1 calls
  alpha_bar: jax.Array    # ᾱ at t (the ε ↔ x₀ conversion of this call)
  alpha_bar_prev: jax.Array  # ᾱ this call's update steps to (1 or ᾱ_0 after the last step)


@struct.dataclass
class Trajectory:
  """Per model call: xs [S, B, ...] the exact network inputs x_t; ts [S] the exact network timesteps;
  outputs [S, B, ...] the ε used by the update (after guidance and correction)."""
  xs: jax.Array
  ts: jax.Array
  outputs: jax.Array


@struct.dataclass
class SampleOutput:
  x0: jax.Array
  trajectory: Optional[Trajectory] = None


# --- timesteps ------------------------------------------------------------------------------------------
def _base_timesteps(n: int, cfg: SamplerConfig) -> np.ndarray:
  """The S distinct sampler timesteps, descending, as the matching diffusers scheduler spaces them."""
  s, spacing = int(cfg.num_steps), cfg.timestep_spacing
  if s > n:
    raise ValueError(f"SamplerConfig.num_steps={s} exceeds the schedule's {n} training timesteps")
  dpm = cfg.name == "dpmpp_2m"            # DPMSolverMultistep spaces S+1 points and drops the last
  if spacing == "quad":                   # Q-Diffusion / ermongroup DDIM `skip_type='quad'`
    ts = (np.linspace(0, np.sqrt(n * 0.8), s) ** 2).astype(np.int64)[::-1]
  elif spacing == "linspace":
    ts = np.linspace(0, n - 1, s + 1 if dpm else s).round()[::-1]
    ts = ts[:-1] if dpm else ts
  elif spacing == "leading":
    ratio = n // (s + 1 if dpm else s)
    ts = (np.arange(0, s + 1 if dpm else s) * ratio).round()[::-1]
    ts = (ts[:-1] if dpm else ts) + cfg.steps_offset
  else:  # trailing
    ts = np.round(np.arange(n, 0, -n / s)) - 1
  ts = np.asarray(ts, np.int64)
  if ts.min() < 0 or ts.max() > n - 1:
    raise ValueError(f"timesteps {ts.tolist()} fall outside 0..{n - 1} (check SamplerConfig.steps_offset="
                     f"{cfg.steps_offset})")
  if cfg.name in ("plms", "dpmpp_2m") and len(np.unique(ts)) != len(ts):
    raise ValueError(f"timestep_spacing={spacing!r} with num_steps={s} repeats timesteps {ts.tolist()}, which "
                     f"the multistep sampler {cfg.name!r} cannot take; use fewer steps or another spacing")
  return ts


def timesteps_for(schedule: NoiseSchedule, cfg: SamplerConfig) -> np.ndarray:
  """The model timesteps of every network call of the sampler, in the order they are fed (int64).

  S values for DDPM/DDIM/DPM-Solver++; S+1 for PLMS, whose second call re-uses the second timestep (as
  diffusers' PNDM with skip_prk_steps). This is exactly `SampleOutput.trajectory.ts`.
  """
  base = _base_timesteps(schedule.num_train_timesteps, cfg)
  if cfg.name == "plms" and len(base) > 1:
    return np.concatenate([base[:2], base[1:]])
  return base


# --- the loop -------------------------------------------------------------------------------------------
def _f32(a):
  return jnp.asarray(a, jnp.float32)


def _alpha_bars(schedule: NoiseSchedule, ts: np.ndarray, final: jax.Array):
  """ᾱ at each timestep and at the next visited one (`final` after the last)."""
  ac = _f32(schedule.alphas_cumprod)
  ab = ac[ts]
  return ab, jnp.concatenate([ab[1:], jnp.reshape(final, (1,))])


def _final_alpha(schedule: NoiseSchedule, cfg: SamplerConfig):
  return jnp.float32(1.0) if cfg.final_alpha_one else _f32(schedule.alphas_cumprod)[0]


def _ddpm_consts(schedule, cfg, ts):
  """diffusers' DDPMScheduler.step ('fixed_small' variance), in float32 as it computes them."""
  a, ap = _alpha_bars(schedule, ts, jnp.float32(1.0))
  beta, beta_prev = 1 - a, 1 - ap
  cur_alpha = a / ap
  cur_beta = 1 - cur_alpha
  c_x0 = (ap ** 0.5 * cur_beta) / beta
  c_x = cur_alpha ** 0.5 * beta_prev / beta
  var = jnp.maximum((1 - ap) / (1 - a) * cur_beta, 1e-20)
  inject = jnp.asarray(ts) > 0                                       # diffusers: noise only if t > 0
  return dict(a=a, ap=ap, c_x0=c_x0, c_x=c_x, c_eps=jnp.zeros_like(a), var=var, inject=inject)


def _ddim_consts(schedule, cfg, ts):
  """diffusers' DDIMScheduler.step (use_clipped_model_output=False)."""
  a, ap = _alpha_bars(schedule, ts, _final_alpha(schedule, cfg))
  beta, beta_prev = 1 - a, 1 - ap
  variance = (beta_prev / beta) * (1 - a / ap)
  std = cfg.eta * variance ** 0.5
  c_eps = jnp.maximum(1 - ap - std ** 2, 0.0) ** 0.5
  return dict(a=a, ap=ap, c_x0=ap ** 0.5, c_x=jnp.zeros_like(a), c_eps=c_eps, var=std * std,
              inject=jnp.ones(len(ts), bool))


def sample(denoise_fn: Callable, schedule: NoiseSchedule, cfg: SamplerConfig, x_T: jax.Array, key: jax.Array,
           cond: Any = None, *, correction: Optional[Callable] = None, return_trajectory: bool = False,
           null_cond: Any = None) -> SampleOutput:
  """Run the sampler from x_T [B, ...]; deterministic given `key` (wrap in `jax.jit` for repeated use).

  denoise_fn(x, t, cond): the raw network output for x [B, ...], t [B] (float32, equal entries), with C or
    2C channels (learned sigma: the first C are used as ε or v).
  correction(eps, StepInfo) -> (eps', noise_var_delta): applied to the (guided) ε of every model call;
    noise_var_delta (scalar or broadcastable to x) is added to the variance of the noise the step injects,
    clamped at ≥ 0 (DDPM, DDIM). DPM-Solver++ and PLMS inject no noise and ignore it.
  null_cond: the unconditional input for classifier-free guidance when cfg.guidance_scale ≠ 1.
  Noise: call i draws `jax.random.normal(jax.random.split(key, num_calls)[i], x_T.shape, x_T.dtype)`.
  """
  if cfg.guidance_scale != 1.0:
    if null_cond is None or cond is None:
      raise ValueError(f"SamplerConfig.guidance_scale={cfg.guidance_scale} needs both `cond` and `null_cond`")
    denoise_fn = classifier_free_guidance(denoise_fn, cfg.guidance_scale, null_cond)
  ts = timesteps_for(schedule, cfg)
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 2:
    raise ValueError(f"x_T must have a batch axis and at least one feature axis; got shape {x_T.shape}")
  b, c = x_T.shape[0], x_T.shape[-1]

  def evaluate(x, i, t, a, ap):
    """(ε, x₀, noise-variance delta, raw) of one model call after correction and clipping; `raw` is the
    corrected output in the model's own parameterisation (ε or v), which PLMS combines as diffusers does."""
    out = denoise_fn(x, jnp.full((b,), t, jnp.float32), cond)
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] < c:
      raise ValueError(f"denoise_fn returned shape {out.shape} for input {x.shape}; expected the input's "
                       f"shape with {c} (or {2 * c}, learned sigma) channels")
    raw = out[..., :c]
    eps, x0 = eps_and_x0(schedule, raw, x, a)
    dv = jnp.float32(0.0)
    if correction is not None:
      eps_c, dv = correction(eps, StepInfo(x, t, i, a, ap))
      eps_c = eps_c.astype(x.dtype)
      x0 = x0 + (eps - eps_c) * ((1 - a) ** 0.5 / a ** 0.5)
      raw = eps_c if schedule.prediction_type == "epsilon" else raw + (eps_c - eps) / a ** 0.5
      eps = eps_c
    if cfg.clip_sample:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return eps, x0, dv, raw

  if cfg.name == "plms":
    run = _plms
  elif cfg.name == "dpmpp_2m":
    run = _dpmpp_2m
  else:
    run = _ancestral
  x_last, (xs, outs) = run(evaluate, schedule, cfg, ts, x_T, key, correction is not None, return_trajectory)
  traj = Trajectory(xs, jnp.asarray(ts, jnp.float32), outs) if return_trajectory else None
  return SampleOutput(x_last, traj)


def _record(keep, x, eps):
  return (x, eps) if keep else (None, None)


def _ancestral(evaluate, schedule, cfg, ts, x_T, key, has_correction, keep):
  """DDPM and DDIM: x_prev = c_x0·x₀ + c_x·x + c_eps·ε + √max(var + δ, 0)·z."""
  k = (_ddpm_consts if cfg.name == "ddpm" else _ddim_consts)(schedule, cfg, ts)
  n = len(ts)
  noisy = cfg.name == "ddpm" or cfg.eta > 0 or has_correction
  keys = jax.random.split(key, n)

  def step(x, inp):
    i, t, a, ap, c_x0, c_x, c_eps, var, inject, kk = inp
    eps, x0, dv, _ = evaluate(x, i, t, a, ap)
    x_prev = c_x0 * x0 + c_eps * eps if cfg.name == "ddim" else c_x0 * x0 + c_x * x
    if noisy:
      z = jax.random.normal(kk, x.shape, x.dtype)
      std = jnp.where(inject, jnp.sqrt(jnp.maximum(var + dv, 0.0)), 0.0)
      x_prev = x_prev + std * z
    return x_prev.astype(x.dtype), _record(keep, x, eps)

  xs = (jnp.arange(n, dtype=jnp.int32), _f32(ts), k["a"], k["ap"], k["c_x0"], k["c_x"], k["c_eps"], k["var"],
        k["inject"], keys)
  return jax.lax.scan(step, x_T, xs)


def _dpmpp_2m(evaluate, schedule, cfg, ts, x_T, key, has_correction, keep):
  """DPM-Solver++(2M), data prediction, midpoint; first order at the first and the last step (diffusers'
  default final σ = 0 forces a first-order last step), coefficients in float32 as diffusers computes them."""
  n = len(ts)
  ac = _f32(schedule.alphas_cumprod)[ts]
  sig = jnp.concatenate([((1 - ac) / ac) ** 0.5, jnp.zeros((1,), jnp.float32)])     # σ = √((1−ᾱ)/ᾱ), then 0
  alpha_t = 1 / (sig ** 2 + 1) ** 0.5
  sigma_t = sig * alpha_t
  lam = jnp.log(alpha_t) - jnp.log(sigma_t)                                          # +inf at σ = 0
  h = lam[1:] - lam[:-1]
  ratio = sigma_t[1:] / sigma_t[:-1]
  c_d = alpha_t[1:] * (jnp.exp(-h) - 1.0)
  idx = np.arange(n)
  second = (idx > 0) & (idx < n - 1)
  h0 = jnp.concatenate([jnp.ones((1,), jnp.float32), lam[1:n] - lam[:n - 1]])     # λ_s0 − λ_s1
  r0 = jnp.where(jnp.asarray(second), h0 / jnp.where(jnp.asarray(second), h, 1.0), 1.0)
  ab_prev = jnp.concatenate([ac[1:], jnp.ones((1,), jnp.float32)])

  def step(carry, inp):
    x, x0_prev = carry
    i, t, a, ap, rat, cd, r, sec = inp
    eps, x0, _, _ = evaluate(x, i, t, a, ap)
    d1 = jnp.where(sec, (1.0 / r) * (x0 - x0_prev), 0.0)
    x_next = rat * x - cd * x0 - 0.5 * cd * d1
    return (x_next.astype(x.dtype), x0), _record(keep, x, eps)

  xs = (jnp.arange(n, dtype=jnp.int32), _f32(ts), ac, ab_prev, ratio, c_d, r0, jnp.asarray(second))
  (x_last, _), rec = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), xs)
  return x_last, rec


def _plms(evaluate, schedule, cfg, ts, x_T, key, has_correction, keep):
  """Pseudo linear multistep (diffusers' PNDM `step_plms`): call 0 takes an Euler-like step and keeps x;
  call 1 re-evaluates at the next timestep and restarts from the kept x with the mean of both outputs (not
  kept in the history); calls k ≥ 2 use Adams–Bashforth weights over the last min(k, 4) outputs. Outputs
  are combined in the model's parameterisation (ε, or v converted afterwards, as diffusers does)."""
  base = _base_timesteps(schedule.num_train_timesteps, cfg)
  n_calls = len(ts)
  ac = _f32(schedule.alphas_cumprod)
  final = _final_alpha(schedule, cfg)
  base_next_ab = jnp.concatenate([ac[base[1:]], jnp.reshape(final, (1,))])
  # the update of call k goes from base[j] to base[j + 1] with j = 0 for calls 0, 1 and j = k − 1 after
  seg = np.array([0] + [max(k - 1, 0) for k in range(1, n_calls)]) if n_calls > 1 else np.zeros(1, np.int64)
  a_cur, a_prev = ac[base][seg], base_next_ab[seg]
  sample_coeff = (a_prev / a_cur) ** 0.5
  denom = a_cur * (1 - a_prev) ** 0.5 + (a_cur * (1 - a_cur) * a_prev) ** 0.5
  c_e = (a_prev - a_cur) / denom
  weights = np.zeros((n_calls, 4), np.float32)
  for k in range(n_calls):
    if k == 0:
      weights[k] = (1, 0, 0, 0)
    elif k == 1:
      weights[k] = (0.5, 0.5, 0, 0)
    else:
      m = min(k, 4)
      weights[k] = {2: (3 / 2, -1 / 2, 0, 0), 3: (23 / 12, -16 / 12, 5 / 12, 0),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}[m]
  kidx = np.arange(n_calls)
  v_pred = schedule.prediction_type == "v_prediction"

  def step(carry, inp):
    x, cur, hist = carry
    i, t, a_model, ap, ac_, sc, ce, w = inp
    eps, _, _, raw = evaluate(x, i, t, a_model, ap)
    e = w[0] * raw + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]
    base_x = jnp.where(i == 1, cur, x)
    if v_pred:   # diffusers combines raw v outputs, then converts at the step's start (ᾱ_cur, base x)
      e = ac_ ** 0.5 * e + (1 - ac_) ** 0.5 * base_x
    x_next = sc * base_x - ce * e
    new_hist = jnp.where(i == 1, hist, jnp.stack([raw, hist[0], hist[1]]))
    new_cur = jnp.where(i == 0, x, cur)
    return (x_next.astype(x.dtype), new_cur, new_hist), _record(keep, x, eps)

  a_model = ac[ts]
  xs = (jnp.asarray(kidx, jnp.int32), _f32(ts), a_model, a_prev, a_cur, sample_coeff, c_e, jnp.asarray(weights))
  hist0 = jnp.zeros((3,) + x_T.shape, x_T.dtype)
  (x_last, _, _), rec = jax.lax.scan(step, (x_T, x_T, hist0), xs)
  return x_last, rec


def make_sample_fn(denoise_fn: Callable, schedule: NoiseSchedule, cfg: SamplerConfig, *,
                   correction: Optional[Callable] = None, return_trajectory: bool = False,
                   null_cond: Any = None) -> Callable:
  """`jax.jit`-compiled `(x_T, key, cond=None) -> SampleOutput` (one compilation per input shape)."""

  @jax.jit
  def run(x_T, key, cond=None):
    return sample(denoise_fn, schedule, cfg, x_T, key, cond, correction=correction,
                  return_trajectory=return_trajectory, null_cond=null_cond)

  return run
