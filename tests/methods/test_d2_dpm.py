"""D²-DPM: the conditional Gaussian of the quantization noise given the quantized output removes a planted
affine distortion; D-D² absorbs and S-D² re-injects the conditional variance."""
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import noise_stats as ns
from dqjax.methods import recipe
from dqjax.methods.d2_dpm import d2_correction
from tests.methods import correction_nets as cn


def test_conditional_mean_removes_planted_distortion_and_variance_signs():
  model, params, ex = cn.mini()
  e = cn.env(4, eta=1.0)
  qm = cn.qmodel(model, params, ex, e)
  fp = qm.denoiser("fp")
  gain, off = jnp.array([0.9, 1.15]), jnp.array([0.04, -0.03])
  planted = lambda x, t, c=None: gain * fp(x, t, c) + off          # Δ is an exact affine function of ε_q
  pairs = ns.collect(qm, 8, seed=0, denoise_q=planted)
  corr, report = d2_correction(pairs, per_channel=True, outlier_std=0.0)
  # ε' = ε_q − E[Δ | ε_q] = ε_fp up to the ρ clip at 0.9999
  hook = corr
  for i in range(4):
    info = type("I", (), {"index": jnp.int32(i), "t": pairs.ts[i]})()
    out, dv = hook(pairs.eps_q[i], info)
    np.testing.assert_allclose(out, pairs.eps_fp[i], atol=2e-2 * float(jnp.std(pairs.eps_fp[i])))
    assert np.all(np.asarray(dv) <= 0)                              # D-D²: variance absorbed
  assert np.asarray(corr.state["scale"]).shape == (4, 2)
  # a noisy residual: S-D² adds exactly what D-D² removes
  noisy = lambda x, t, c=None: fp(x, t, c) + 0.1 * jnp.sin(997.0 * x)
  pairs2 = ns.collect(qm, 8, seed=0, denoise_q=noisy)
  det, _ = d2_correction(pairs2, variant="deterministic", per_channel=False)
  sto, _ = d2_correction(pairs2, variant="stochastic", per_channel=False)
  np.testing.assert_allclose(det.state["var"], -np.asarray(sto.state["var"]), rtol=1e-6)
  assert np.all(np.asarray(sto.state["var"]) > 0)
  with pytest.raises(ValueError, match="variant"):
    d2_correction(pairs2, variant="explicit")


def test_recipe_attaches_channel_wise_correction():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  qm = recipe.build("d2_dpm")(model, params, ex, data, w_bits=4, a_bits=8, env=e)
  assert [c.name for c in qm.corrections] == ["d2_dpm"]
  st = qm.corrections[0].state
  assert st["scale"].shape == (4, 2) and st["var"].shape == (4, 2)
  assert np.all(np.isfinite(np.asarray(st["shift"])))
  with pytest.raises(ValueError, match="variant"):
    recipe.build("d2_dpm", {"variant": "nope"})
