"""The ε-statistics collector: exact ε coefficients of every sampler, planted noise models recovered, and the
side-by-side collection on a real (mini) denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import noise_stats as ns
from dqjax.diffusion import samplers
from tests.methods import correction_nets as cn


def test_eps_coefficients_match_the_ddim_update():
  s = cn.SCHEDULE
  for eta in (0.0, 1.0):
    cfg = samplers.SamplerConfig("ddim", 6, eta=eta)
    c = ns.eps_coefficients(s, cfg)
    ts = samplers.timesteps_for(s, cfg)
    a = np.asarray(s.alphas_cumprod, np.float64)[ts]
    ap = np.concatenate([a[1:], [1.0]])
    var = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
    np.testing.assert_allclose(c, np.sqrt(1 - ap - var) - np.sqrt(ap * (1 - a) / a), atol=2e-6)
  # DDPM: x_prev = c_x0·x0 + c_x·x with x0 = (x − √(1−ᾱ)ε)/√ᾱ
  cfg = samplers.SamplerConfig("ddpm", 5)
  ts = samplers.timesteps_for(s, cfg)
  a = np.asarray(s.alphas_cumprod, np.float64)[ts]
  ap = np.concatenate([a[1:], [1.0]])
  c_x0 = np.sqrt(ap) * (1 - a / ap) / (1 - a)
  np.testing.assert_allclose(ns.eps_coefficients(s, cfg), -c_x0 * np.sqrt(1 - a) / np.sqrt(a), rtol=1e-4)


def test_statistics_recover_planted_noise_models():
  key = jax.random.split(jax.random.key(0), 4)
  s, n, c = 3, 64, 4
  eps = jax.random.normal(key[0], (s, n, 6, 6, c))
  k = jnp.array([0.2, -0.1, 0.05])
  b = jax.random.normal(key[1], (s, c)) * 0.1
  sigma = jnp.array([0.05, 0.1, 0.2])
  r = jax.random.normal(key[2], eps.shape) * sigma[:, None, None, None, None]
  delta = k[:, None, None, None, None] * eps + b[:, None, None, None, :] + r
  k_hat = ns.regression_slope(eps, delta)
  np.testing.assert_allclose(k_hat, k, atol=0.01)
  mean, var = ns.residual_stats(eps, delta, k_hat, per_channel=True)
  np.testing.assert_allclose(mean, b, atol=0.01)
  np.testing.assert_allclose(np.sqrt(var), sigma, rtol=0.05)
  # joint Gaussian of (ε_q, Δ): the conditional mean slope is Cov/Var, outliers (> 4σ) are dropped
  eps_q = eps + delta
  mean2, cov = ns.joint_gaussian(eps_q, delta, per_channel=False, outlier_std=0.0)
  x, y = np.asarray(eps_q[1]).ravel(), np.asarray(delta[1]).ravel()
  np.testing.assert_allclose(cov[1], np.cov(np.stack([x, y])), rtol=1e-4)
  beta, icpt, vc = ns.conditional_gaussian(mean2, cov)
  ref = np.cov(np.stack([x, y]))
  assert beta[1] == pytest.approx(ref[0, 1] / ref[0, 0], rel=1e-4)
  assert vc[1] == pytest.approx(ref[1, 1] - ref[0, 1] ** 2 / ref[0, 0], rel=1e-3)
  spiky = delta.at[0, 0, 0, 0, 0].set(1e3)
  _, cov_o = ns.joint_gaussian(eps_q, spiky, per_channel=True, outlier_std=4.0)
  _, cov_c = ns.joint_gaussian(eps_q, delta, per_channel=True, outlier_std=4.0)
  assert float(cov_o[0, 0, 1, 1]) == pytest.approx(float(cov_c[0, 0, 1, 1]), rel=0.05)   # the spike is ignored
  # masked least squares: a planted per-channel gain is recovered exactly when ε_q is a pure rescaling
  gain = jnp.array([0.8, 1.0, 1.25, 0.9])
  scale = ns.masked_channel_scale(eps * gain, eps, keep=0.5)
  np.testing.assert_allclose(scale, jnp.broadcast_to(1 / gain, (s, c)), rtol=1e-5)


def test_collect_side_by_side_with_a_planted_quantized_denoiser():
  model, params, ex = cn.mini()
  e = cn.env(4)
  qm = cn.qmodel(model, params, ex, e)
  k, bias = 0.15, jnp.array([0.05, -0.02])
  fp = qm.denoiser("fp")
  planted = lambda x, t, c=None: (1 + k) * fp(x, t, c) + bias
  pairs = ns.collect(qm, 8, seed=0, denoise_q=planted)
  assert pairs.eps_fp.shape == (4, 8, 8, 8, 2) and pairs.ts.shape == (4,)
  np.testing.assert_allclose(ns.regression_slope(pairs.eps_fp, pairs.delta), k, atol=1e-4)
  mean, var = ns.residual_stats(pairs.eps_fp, pairs.delta, jnp.full((4,), k))
  np.testing.assert_allclose(mean, jnp.broadcast_to(bias, (4, 2)), atol=1e-5)
  assert float(jnp.max(var)) < 1e-9
  # eps_fp is the FP model's prediction at exactly the inputs the quantized one saw; same seed, same pairs
  again = ns.collect(qm, 8, seed=0, denoise_q=planted)
  assert np.array_equal(np.asarray(again.eps_q), np.asarray(pairs.eps_q))
  ref = jax.vmap(lambda x, t: fp(x, jnp.full((8,), t)))(pairs.xs, pairs.ts)
  np.testing.assert_allclose(pairs.eps_fp, ref, atol=1e-5)
  with pytest.raises(ValueError, match="DiffusionEnv"):
    ns.collect(qm.replace(env=None), 4)
