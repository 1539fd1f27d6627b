"""Samplers: shapes, determinism, oracle recovery, the correction hook, CFG, sharding, config errors."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dqjax.diffusion import guidance, samplers, schedules

SCHED = schedules.make_schedule("linear", 1000)
AC = np.asarray(SCHED.alphas_cumprod, np.float64)
ALL = ["ddpm", "ddim", "plms", "dpmpp_2m"]


def toy(x, t, cond=None):
  """A deterministic stand-in for a network: depends on x, t and (if given) integer labels."""
  out = 0.5 * jnp.tanh(x) * jnp.cos(t / 500.0)[:, None, None, None] + 0.05 * x
  if cond is not None:
    out = out + 0.1 * cond.astype(jnp.float32)[:, None, None, None]
  return out


def x_T(b=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, 4, 4, 2))


# --- shapes, determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_shapes_trajectory_and_determinism(name):
  cfg = samplers.SamplerConfig(name, 5, eta=0.0)
  x = x_T()
  ts = samplers.timesteps_for(SCHED, cfg)
  assert len(ts) == (6 if name == "plms" else 5) and np.all(np.diff(ts) <= 0)
  out = samplers.sample(toy, SCHED, cfg, x, jax.random.key(1), return_trajectory=True)
  tr = out.trajectory
  assert out.x0.shape == x.shape and out.x0.dtype == jnp.float32
  assert tr.xs.shape == (len(ts),) + x.shape and tr.outputs.shape == (len(ts),) + x.shape
  np.testing.assert_array_equal(np.asarray(tr.ts), ts)
  np.testing.assert_array_equal(np.asarray(tr.xs[0]), np.asarray(x))          # first input is x_T
  # outputs are the ε the network gave at the recorded inputs (ε-prediction, no guidance/correction)
  for i in (0, len(ts) - 1):
    np.testing.assert_allclose(np.asarray(tr.outputs[i]),
                               np.asarray(toy(tr.xs[i], jnp.full((2,), float(ts[i])))), atol=1e-6)
  again = samplers.sample(toy, SCHED, cfg, x, jax.random.key(1), return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(again.x0), np.asarray(out.x0))                  # bit-identical
  no_traj = samplers.sample(toy, SCHED, cfg, x, jax.random.key(1))
  assert no_traj.trajectory is None
  np.testing.assert_allclose(np.asarray(no_traj.x0), np.asarray(out.x0), rtol=1e-6, atol=1e-6)
  other = samplers.sample(toy, SCHED, cfg, x, jax.random.key(2)).x0
  if name == "ddpm":
    assert not np.allclose(np.asarray(other), np.asarray(no_traj.x0))
  else:                                                                         # deterministic samplers
    np.testing.assert_array_equal(np.asarray(other), np.asarray(no_traj.x0))
  jitted = samplers.make_sample_fn(toy, SCHED, cfg)(x, jax.random.key(1))
  np.testing.assert_allclose(np.asarray(jitted.x0), np.asarray(out.x0), rtol=1e-5, atol=1e-5)


def test_ddim_eta_draws_noise_from_the_key():
  cfg = samplers.SamplerConfig("ddim", 5, eta=1.0)
  a = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(1)).x0
  b = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(2)).x0
  c = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(1)).x0
  assert not np.allclose(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_schedule_may_be_a_jit_argument():
  cfg = samplers.SamplerConfig("dpmpp_2m", 4)
  f = jax.jit(lambda s, x: samplers.sample(toy, s, cfg, x, jax.random.key(0)).x0)
  np.testing.assert_allclose(np.asarray(f(SCHED, x_T())),
                             np.asarray(samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(0)).x0), atol=1e-5)


# --- oracle: a perfect denoiser for a single data point ---------------------------------------------------
def oracle(schedule, target):
  ac = jnp.asarray(schedule.alphas_cumprod)

  def f(x, t, cond=None):
    ab = ac[t.astype(jnp.int32)][:, None, None, None]
    eps = (x - jnp.sqrt(ab) * target) / jnp.sqrt(1 - ab)
    if schedule.prediction_type == "epsilon":
      return eps
    return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * target

  return f


@pytest.mark.parametrize("name,spacing,prediction", [
    ("ddim", "leading", "epsilon"), ("ddim", "quad", "epsilon"), ("ddim", "trailing", "v_prediction"),
    ("ddpm", "leading", "epsilon"), ("plms", "leading", "epsilon"), ("dpmpp_2m", "linspace", "v_prediction")])
def test_oracle_denoiser_recovers_the_data_point(name, spacing, prediction):
  """With the exact ε of a one-point data set, ε is constant along the probability-flow path, every sampler
  here integrates it exactly, and x₀ = the point (PLMS asked to end at ᾱ = 1, not PNDM's default ᾱ_0)."""
  sched = schedules.make_schedule("linear", 1000, prediction_type=prediction)
  target = jax.random.uniform(jax.random.key(3), (1, 4, 4, 2), minval=-1, maxval=1)
  extra = {"set_alpha_to_one": True} if name == "plms" else {}
  cfg = samplers.SamplerConfig(name, 10, timestep_spacing=spacing, **extra)
  out = samplers.sample(oracle(sched, target), sched, cfg, x_T(1), jax.random.key(0)).x0
  np.testing.assert_allclose(np.asarray(out), np.asarray(target), atol=1e-4)


# --- correction hook --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("plms", 0.0),
                                      ("dpmpp_2m", 0.0)])
def test_identity_correction_changes_nothing(name, eta):
  cfg = samplers.SamplerConfig(name, 5, eta=eta)
  ref = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(4), return_trajectory=True)
  cor = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(4), return_trajectory=True,
                        correction=lambda eps, info: (eps, 0.0))
  np.testing.assert_array_equal(np.asarray(cor.x0), np.asarray(ref.x0))
  np.testing.assert_array_equal(np.asarray(cor.trajectory.outputs), np.asarray(ref.trajectory.outputs))


@pytest.mark.parametrize("name", ALL)
def test_step_info_contents(name):
  cfg = samplers.SamplerConfig(name, 5)
  ts = samplers.timesteps_for(SCHED, cfg)

  def hook(eps, info):
    """Writes the StepInfo scalars into example 0 and info.x into example 1; the trajectory records it."""
    out = jnp.zeros_like(eps).at[1].set(info.x[1])
    for j, v in enumerate((info.t, info.index, info.alpha_bar, info.alpha_bar_prev)):
      out = out.at[0, 0, j, 0].set(jnp.asarray(v, jnp.float32))
    return out, 0.0

  out = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(0), correction=hook, return_trajectory=True)
  seen = np.asarray(out.trajectory.outputs)[:, 0, 0, :4, 0]
  np.testing.assert_array_equal(np.asarray(out.trajectory.outputs)[:, 1], np.asarray(out.trajectory.xs)[:, 1])
  np.testing.assert_array_equal(seen[:, 0], ts)
  np.testing.assert_array_equal(seen[:, 1], np.arange(len(ts)))
  np.testing.assert_allclose(seen[:, 2], AC[ts], rtol=1e-6)
  base = ts if name != "plms" else np.concatenate([ts[:1], ts[2:]])     # the distinct timesteps
  final = AC[0] if name == "plms" else 1.0                               # PNDM's set_alpha_to_one=False
  nxt = np.concatenate([AC[base[1:]], [final]])
  expected_prev = nxt if name != "plms" else np.concatenate([nxt[:1], nxt])   # call 1 redoes step 0
  np.testing.assert_allclose(seen[:, 3], expected_prev, rtol=1e-6)


def test_constant_eps_offset_gives_the_predicted_shift():
  """DDIM (η=0) integrates d(x/√ᾱ) = ε dσ exactly for ε independent of x, with σ = √((1−ᾱ)/ᾱ); adding δ to
  ε at every step therefore shifts x₀ by −σ(t_first)·δ (ᾱ = 1 after the last step)."""
  f = lambda x, t, cond=None: jnp.zeros_like(x) + jnp.sin(t / 300.0)[:, None, None, None]
  cfg = samplers.SamplerConfig("ddim", 8)
  t0 = samplers.timesteps_for(SCHED, cfg)[0]
  delta = 0.01
  ref = samplers.sample(f, SCHED, cfg, x_T(), jax.random.key(0)).x0
  cor = samplers.sample(f, SCHED, cfg, x_T(), jax.random.key(0), correction=lambda e, i: (e + delta, 0.0)).x0
  sigma_t0 = np.sqrt((1 - AC[t0]) / AC[t0])
  np.testing.assert_allclose(np.asarray(cor - ref), -sigma_t0 * delta, rtol=1e-4)


def test_noise_variance_delta_is_added_to_the_injected_noise():
  """DDIM η=0 with a zero model and δvar = v injects √v·z_i: x_{i+1} = √(ᾱ'/ᾱ) x_i + √v z_i."""
  zero = lambda x, t, cond=None: jnp.zeros_like(x)
  cfg = samplers.SamplerConfig("ddim", 5)
  ts = samplers.timesteps_for(SCHED, cfg)
  key, v = jax.random.key(9), 0.04
  out = samplers.sample(zero, SCHED, cfg, x_T(), key, correction=lambda e, i: (e, v)).x0
  x = np.asarray(x_T(), np.float64)
  prev = np.concatenate([AC[ts[1:]], [1.0]])
  for i, k in enumerate(jax.random.split(key, len(ts))):
    x = np.sqrt(prev[i] / AC[ts[i]]) * x + np.sqrt(v) * np.asarray(jax.random.normal(k, x.shape))
  np.testing.assert_allclose(np.asarray(out), x, rtol=1e-4, atol=1e-5)


def test_negative_variance_delta_is_clamped():
  """A δvar below −σ² removes DDPM's noise entirely: the result no longer depends on the key."""
  cfg = samplers.SamplerConfig("ddpm", 5)
  hook = lambda e, i: (e, -1e9)
  a = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(1), correction=hook).x0
  b = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(2), correction=hook).x0
  assert np.all(np.isfinite(np.asarray(a)))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  noisy = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(1)).x0
  assert not np.allclose(np.asarray(noisy), np.asarray(a))


# --- guidance, learned sigma ------------------------------------------------------------------------------
def test_classifier_free_guidance_one_batch_and_formula():
  calls = []

  def model(x, t, cond):
    calls.append(x.shape[0])
    eps = jnp.tanh(x) + 0.3 * cond.astype(jnp.float32)[:, None, None, None]
    sig = jnp.broadcast_to(cond.astype(jnp.float32)[:, None, None, None], x.shape)
    return jnp.concatenate([eps, sig], -1)          # learned sigma: 2C channels

  x, labels, null, s = x_T(3), jnp.array([0, 1, 2]), 5, 2.5
  out = guidance.classifier_free_guidance(model, s, null)(x, jnp.full((3,), 10.0), labels)
  assert calls == [6]                               # cond and null in ONE concatenated call
  eps_c = jnp.tanh(x) + 0.3 * labels[:, None, None, None]
  eps_u = jnp.tanh(x) + 0.3 * null
  np.testing.assert_allclose(np.asarray(out[..., :2]), np.asarray(eps_u + s * (eps_c - eps_u)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out[..., 2:]),
                             np.broadcast_to(np.asarray(labels, np.float32)[:, None, None, None], x.shape))


def test_sampler_guidance_scale_and_learned_sigma():
  with_sigma = lambda x, t, c: jnp.concatenate([toy(x, t, c), jnp.full_like(x, 7.0)], -1)
  labels = jnp.array([0, 1])
  cfg = samplers.SamplerConfig("ddim", 5, guidance_scale=3.0)
  a = samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(0), labels, null_cond=2).x0
  b = samplers.sample(with_sigma, SCHED, cfg, x_T(), jax.random.key(0), labels, null_cond=2).x0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))                   # sigma channels ignored
  manual = guidance.classifier_free_guidance(toy, 3.0, 2)
  c = samplers.sample(manual, SCHED, samplers.SamplerConfig("ddim", 5), x_T(), jax.random.key(0), labels).x0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  unguided = samplers.sample(toy, SCHED, samplers.SamplerConfig("ddim", 5), x_T(), jax.random.key(0), labels).x0
  assert not np.allclose(np.asarray(a), np.asarray(unguided))
  with pytest.raises(ValueError, match="null_cond"):
    samplers.sample(toy, SCHED, cfg, x_T(), jax.random.key(0), labels)


# --- sharding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m"])
def test_batch_sharded_sampling_matches_unsharded(name):
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  shard = NamedSharding(mesh, P("batch"))
  x = x_T(8, seed=5)
  labels = jnp.arange(8) % 3
  cfg = samplers.SamplerConfig(name, 5, guidance_scale=2.0)
  run = samplers.make_sample_fn(toy, SCHED, cfg, return_trajectory=True, null_cond=3)
  ref = run(x, jax.random.key(0), labels)
  out = run(jax.device_put(x, shard), jax.random.key(0), jax.device_put(labels, shard))
  assert len(out.x0.sharding.device_set) == 8                                   # stayed distributed
  np.testing.assert_allclose(np.asarray(out.x0), np.asarray(ref.x0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.trajectory.xs), np.asarray(ref.trajectory.xs), atol=1e-5)


# --- timesteps and configs ------------------------------------------------------------------------------
def test_quad_spacing_is_q_diffusions():
  for steps in (25, 100):
    seq = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2)]   # ermongroup/ddim
    ts = samplers.timesteps_for(SCHED, samplers.SamplerConfig("ddim", steps, timestep_spacing="quad"))
    np.testing.assert_array_equal(ts, seq[::-1])
  with pytest.raises(ValueError, match="repeats timesteps"):      # 100 quad steps repeat t = 0
    samplers.timesteps_for(SCHED, samplers.SamplerConfig("dpmpp_2m", 100, timestep_spacing="quad"))


def test_plms_calls_its_second_timestep_twice():
  ts = samplers.timesteps_for(SCHED, samplers.SamplerConfig("plms", 4))
  np.testing.assert_array_equal(ts, [750, 500, 500, 250, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="euler"), "name"), (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(num_steps=0), "num_steps"), (dict(eta=-1.0), "eta"), (dict(name="plms", eta=0.5), "eta"),
    (dict(name="plms", clip_sample=True), "clip_sample"), (dict(steps_offset=-1), "steps_offset"),
    (dict(name="ddpm", set_alpha_to_one=False), "set_alpha_to_one")])
def test_bad_sampler_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    samplers.SamplerConfig(**kwargs)


def test_too_many_steps_and_bad_outputs_raise():
  with pytest.raises(ValueError, match="num_steps"):
    samplers.timesteps_for(schedules.make_schedule("linear", 10), samplers.SamplerConfig("ddim", 11))
  with pytest.raises(ValueError, match="channels"):
    samplers.sample(lambda x, t, c: x[..., :1], SCHED, samplers.SamplerConfig("ddim", 2), x_T(), jax.random.key(0))


def test_schedules_and_their_errors():
  cos = schedules.make_schedule("cosine", 1000)
  assert float(cos.betas.max()) <= np.float32(0.999) and cos.num_train_timesteps == 1000
  sl = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  np.testing.assert_allclose(float(sl.betas[0]), 0.00085, rtol=1e-5)
  np.testing.assert_allclose(float(sl.betas[-1]), 0.012, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sl.alphas), 1 - np.asarray(sl.betas))
  for bad, match in [(dict(kind="sigmoid"), "kind"), (dict(prediction_type="sample"), "prediction_type"),
                     (dict(num_train_timesteps=1), "num_train_timesteps"), (dict(beta_start=0.5, beta_end=0.1),
                                                                           "beta_start")]:
    with pytest.raises(ValueError, match=match):
      schedules.make_schedule(**bad)
  # ε/v/x₀ helpers are mutually consistent
  sv = schedules.make_schedule("linear", prediction_type="v_prediction")
  x0, noise, t = x_T(), x_T(seed=1), jnp.array([10, 900])
  xt = schedules.q_sample(sv, x0, t, noise)
  v = schedules.training_target(sv, x0, t, noise)
  ab = schedules.alpha_bar_at(sv, t)
  np.testing.assert_allclose(np.asarray(schedules.eps_from_output(sv, v, xt, ab)), np.asarray(noise), atol=1e-5)
  np.testing.assert_allclose(np.asarray(schedules.x0_from_output(sv, v, xt, ab)), np.asarray(x0), atol=1e-5)
