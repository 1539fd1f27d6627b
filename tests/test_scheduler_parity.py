"""Parity of dqjax's samplers with diffusers' torch schedulers: same β/ᾱ, same timestep sequences, same step
outputs given identical model outputs (and identical injected noise).

The fake model is a deterministic function of (x, t) whose implied x₀ stays O(1), so float32 rounding is
not amplified by 1/√ᾱ at the noisiest steps. Tolerances: step outputs (teacher-forced: diffusers is fed our
trajectory's x_t and the same model output) agree within 1e-5 relative to max(1, |x|); free-running
loops within 1e-4 (multistep feedback amplifies rounding a little over 10–20 steps).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm  # noqa: E402

from dqjax.diffusion import samplers, schedules  # noqa: E402

pytestmark = pytest.mark.parity

STEP_TOL = 1e-5
FREE_TOL = 1e-4
BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
SCHEDULERS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
              "plms": diffusers.PNDMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}


def fake_model(schedule):
  ac = jnp.asarray(schedule.alphas_cumprod)

  @jax.jit
  def f(x, t, cond=None):
    ab = ac[t.astype(jnp.int32)][:, None, None, None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    return (x - a * jnp.tanh(x)) / s + 0.1 * a * jnp.sin(1.7 * x + t[:, None, None, None] / 250.0)

  return f


def diffusers_scheduler(name, kind, prediction, spacing, **extra):
  b0, b1 = BETA_RANGE[kind]
  kw = dict(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=BETA_NAMES[kind],
            prediction_type=prediction, timestep_spacing=spacing)
  if name in ("ddpm", "ddim"):
    kw["clip_sample"] = False
  if name == "plms":
    kw["skip_prk_steps"] = True
  kw.update(extra)
  return SCHEDULERS[name](**kw)


def _rel(a, ref):
  return float(np.abs(np.asarray(a) - np.asarray(ref)).max() / max(1.0, float(np.abs(ref).max())))


def compare(name, kind, prediction, spacing, steps, *, eta=0.0, diffusers_extra=None, cfg_extra=None,
            monkeypatch=None):
  b0, b1 = BETA_RANGE[kind]
  schedule = schedules.make_schedule(kind, 1000, b0, b1, prediction)
  cfg = samplers.SamplerConfig(name, steps, eta=eta, timestep_spacing=spacing, **(cfg_extra or {}))
  sched = diffusers_scheduler(name, kind, prediction, spacing, **(diffusers_extra or {}))
  sched.set_timesteps(steps)
  ts = samplers.timesteps_for(schedule, cfg)
  np.testing.assert_array_equal(sched.timesteps.numpy(), ts)

  f = fake_model(schedule)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  key = jax.random.key(1)
  out = samplers.sample(f, schedule, cfg, x_T, key, return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(out.trajectory.ts), ts)
  noises = [torch.tensor(np.asarray(jax.random.normal(k, x_T.shape))) for k in jax.random.split(key, len(ts))]
  xs = np.asarray(out.trajectory.xs)

  def step(i, model_out, x):
    if name == "ddpm":   # DDPMScheduler draws its own noise: hand it ours
      monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *a, **k: noises[i])
    kw = {"variance_noise": noises[i], "eta": eta} if name == "ddim" else {}
    return sched.step(model_out, int(ts[i]), x, **kw).prev_sample

  worst = 0.0                         # teacher-forced: one step at a time from our own trajectory
  for i in range(len(ts)):
    mo = torch.tensor(np.asarray(f(jnp.asarray(xs[i]), jnp.full((2,), float(ts[i])))))
    nxt = step(i, mo, torch.tensor(xs[i])).numpy()
    ref = xs[i + 1] if i + 1 < len(ts) else np.asarray(out.x0)
    worst = max(worst, _rel(ref, nxt))
  assert worst <= STEP_TOL, f"{name} {kind} {prediction} {spacing}: step error {worst:.2e}"

  sched.set_timesteps(steps)           # free-running diffusers loop from the same x_T
  x = torch.tensor(np.asarray(x_T))
  for i in range(len(ts)):
    mo = torch.tensor(np.asarray(f(jnp.asarray(x.numpy()), jnp.full((2,), float(ts[i])))))
    x = step(i, mo, x)
  free = _rel(out.x0, x.numpy())
  assert free <= FREE_TOL, f"{name} {kind} {prediction} {spacing}: free-run error {free:.2e}"


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_bit_identical(kind):
  b0, b1 = BETA_RANGE[kind]
  ours = schedules.make_schedule(kind, 1000, b0, b1)
  ref = diffusers_scheduler("ddim", kind, "epsilon", "leading")
  np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
  np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", ["ddpm", "ddim", "plms", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
def test_timestep_sequences(name, spacing, steps):
  schedule = schedules.make_schedule("linear")
  sched = diffusers_scheduler(name, "linear", "epsilon", spacing)
  sched.set_timesteps(steps)
  ts = samplers.timesteps_for(schedule, samplers.SamplerConfig(name, steps, timestep_spacing=spacing))
  np.testing.assert_array_equal(sched.timesteps.numpy(), ts)


CASES = [  # (sampler, β kind, prediction, spacing, steps)
    ("ddpm", "linear", "epsilon", "leading", 10),
    ("ddpm", "scaled_linear", "v_prediction", "trailing", 10),
    ("ddpm", "cosine", "epsilon", "linspace", 8),
    ("ddim", "linear", "epsilon", "leading", 10),
    ("ddim", "scaled_linear", "v_prediction", "trailing", 20),
    ("ddim", "cosine", "epsilon", "leading", 10),
    ("plms", "linear", "epsilon", "leading", 10),
    ("plms", "scaled_linear", "v_prediction", "leading", 20),
    ("plms", "scaled_linear", "epsilon", "trailing", 10),
    ("dpmpp_2m", "linear", "epsilon", "linspace", 10),
    ("dpmpp_2m", "scaled_linear", "v_prediction", "leading", 20),
    ("dpmpp_2m", "linear", "epsilon", "trailing", 16),
    ("dpmpp_2m", "cosine", "v_prediction", "linspace", 10),
]


@pytest.mark.parametrize("name,kind,prediction,spacing,steps", CASES)
def test_step_parity(name, kind, prediction, spacing, steps, monkeypatch):
  compare(name, kind, prediction, spacing, steps, monkeypatch=monkeypatch)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_parity_with_fixed_noise(eta):
  compare("ddim", "linear", "epsilon", "leading", 10, eta=eta)


def test_stable_diffusion_style_configs():
  """steps_offset=1 and set_alpha_to_one=False, as Stable Diffusion's scheduler config has them."""
  sd = dict(steps_offset=1, set_alpha_to_one=False)
  compare("ddim", "scaled_linear", "epsilon", "leading", 10, diffusers_extra=sd, cfg_extra=sd)
  compare("plms", "scaled_linear", "epsilon", "leading", 10, diffusers_extra=sd, cfg_extra=sd)


def test_clip_sample_parity(monkeypatch):
  compare("ddim", "linear", "epsilon", "leading", 10, diffusers_extra={"clip_sample": True},
          cfg_extra={"clip_sample": True})
  compare("ddpm", "linear", "epsilon", "leading", 10, diffusers_extra={"clip_sample": True},
          cfg_extra={"clip_sample": True}, monkeypatch=monkeypatch)
