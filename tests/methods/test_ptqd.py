"""PTQD: a planted correlated quantization noise (1 + k)·ε + b is estimated and divided out exactly; the
residual variance is absorbed by the sampler; step-aware mixed precision switches the activation bits by
timestep."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import calibrate
from dqjax.calib import noise_stats as ns
from dqjax.methods import recipe
from dqjax.methods._act_extra import ExtQModel, flags_to_timesteps, set_step_precision
from dqjax.methods.ptqd import ptqd_correction, quantization_snr_steps
from dqjax.methods import ptqd as ptqd_mod
from tests.methods import correction_nets as cn


def test_planted_correlated_noise_is_removed_exactly():
  model, params, ex = cn.mini()
  e = cn.env(4)
  qm = cn.qmodel(model, params, ex, e)
  k, bias = 0.2, jnp.array([0.03, -0.05])
  fp = qm.denoiser("fp")
  planted = lambda x, t, c=None: (1 + k) * fp(x, t, c) + bias
  pairs = ns.collect(qm, 8, seed=0, denoise_q=planted)
  corr, report = ptqd_correction(pairs)
  np.testing.assert_allclose(report["k"], k, atol=1e-4)           # the estimated k recovers the planted one
  np.testing.assert_allclose(corr.state["scale"], 1 / (1 + k), rtol=1e-4)
  x, conds, key = ns.initial_state(qm, 8, 5)
  ref = ns.sample_fn(qm, fp)(x, conds, key).x0
  raw = ns.sample_fn(qm, planted)(x, conds, key).x0
  fixed = ns.sample_fn(qm, planted, correction=corr)(x, conds, key).x0
  err_raw = float(jnp.max(jnp.abs(raw - ref)))
  assert err_raw > 0.05
  assert float(jnp.max(jnp.abs(fixed - ref))) < 1e-3 * err_raw


def test_residual_variance_is_absorbed_in_units_of_the_update():
  model, params, ex = cn.mini()
  e = cn.env(4, eta=1.0)
  qm = cn.qmodel(model, params, ex, e)
  fp = qm.denoiser("fp")
  # a deterministic stand-in for an uncorrelated residual: a high-frequency function of the input
  planted = lambda x, t, c=None: 1.1 * fp(x, t, c) + 0.1 * jnp.sin(997.0 * x)
  pairs = ns.collect(qm, 8, seed=0, denoise_q=planted)
  corr, report = ptqd_correction(pairs)
  k = np.asarray(report["k"])
  sigma = np.asarray(report["residual_std"])
  assert np.all(sigma > 0.05)
  expect = -(np.asarray(pairs.coef) ** 2) * sigma ** 2 / (1 + np.maximum(k, 0)) ** 2
  np.testing.assert_allclose(corr.state["var"], expect, rtol=1e-4)
  ts = samplers_ts = np.asarray(pairs.ts)
  assert samplers_ts.shape == ts.shape and np.all(np.asarray(corr.state["var"]) < 0)


def test_snr_rule_flags_low_snr_steps():
  s = 3
  eps = jnp.ones((s, 2, 2, 2, 1))
  delta = eps * jnp.array([0.01, 0.5, 0.9])[:, None, None, None, None]     # SNR 1e4, 4, 1.23
  pairs = ns.EpsPairs(eps, jnp.array([900.0, 500.0, 100.0]), jnp.array([0.05, 0.5, 0.9]), jnp.ones(s),
                      eps, eps + delta)
  # diffusion SNR ᾱ/(1-ᾱ): 0.053, 1, 9 -> only the last step's quantization SNR (1.23) is below it
  assert quantization_snr_steps(pairs).tolist() == [False, False, True]
  on = flags_to_timesteps([False, False, True], [900, 500, 100], 1000)
  assert bool(on[100]) and bool(on[0]) and not bool(on[500]) and not bool(on[999])


def test_step_precision_switches_bits_by_timestep_and_recipe_attaches_correction():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  rec = recipe.build("ptqd")
  lo = recipe.prepare(model, params, rec.rules(8, 4), ex, warn_unused=False)
  lo = calibrate.calibrate_activations(calibrate.calibrate_weights(lo, "minmax"), data, "minmax")
  hi = recipe.prepare(model, params, rec.rules(8, 8), ex, warn_unused=False)
  hi = calibrate.calibrate_activations(calibrate.calibrate_weights(hi, "minmax"), data, "minmax")
  on = jnp.zeros((1000,), bool).at[600:].set(True)
  mixed = set_step_precision(lo, hi, on, 8)
  assert isinstance(mixed, ExtQModel)
  x = data.xs[0][:4]
  for t, ref in ((800.0, hi), (200.0, lo)):
    tt = jnp.full((4,), t)
    np.testing.assert_allclose(mixed.apply(x, tt), ref.apply(x, tt), atol=1e-5)
  assert float(jnp.max(jnp.abs(lo.apply(x, jnp.full((4,), 800.0)) - hi.apply(x, jnp.full((4,), 800.0))))) > 1e-3
  # the recipe: the code's layer choices, and a PTQD correction with per-step tables
  qm = rec(model, params, ex, data, w_bits=8, a_bits=8, env=e)
  assert [c.name for c in qm.corrections] == ["ptqd"]
  assert qm.corrections[0].state["shift"].shape == (4, 2)
  assert qm.plan["conv_in"].weight.bits == 8 and not qm.plan["attn1/qk_matmul"].quantized
  assert len(qm.meta["ptqd"]["k"]) == 4
  assert ptqd_mod.rules(None)(4, 8)[0].keep_fp
  with pytest.raises(ValueError, match="entries"):
    from dqjax.methods._correction import affine_correction
    affine_correction("ptqd", jnp.zeros(3), scale=jnp.ones(4))
  _ = jax
