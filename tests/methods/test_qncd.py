"""QNCD: the intra-step smoothing factors are γ_norm2 · max(mean(max(GN(emb_out), 1)), 1) folded into conv2
(float function unchanged); the inter-step estimate finds a planted mean noise and is held between
estimation steps."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import recipe
from dqjax.methods.qncd import embedding_factors, held_estimates, renoise_means, smoothing_pass
from dqjax.transform import apply as qapply
from tests.methods import correction_nets as cn


def test_embedding_factors_and_equivalent_fold():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  qm = cn.qmodel(model, params, ex, e)
  f = embedding_factors(qm, data, groups=4, eps=1e-5, min_factor=0.0)
  assert list(f) == ["resnets_0"]
  # reference: the projection of silu(temb) for every calibration (t) sample, by hand
  x, t, _ = data.flat()
  from dqjax.models import layers
  emb_in = layers.timestep_embedding(t, 8, True, 0)
  te = params["time_embedding"]
  h = jax.nn.silu(emb_in @ te["linear_1"]["kernel"] + te["linear_1"]["bias"]) @ te["linear_2"]["kernel"] + \
      te["linear_2"]["bias"]
  p = params["resnets_0"]["time_emb_proj"]
  emb = jax.nn.silu(h) @ p["kernel"] + p["bias"]
  g = emb.reshape(-1, 4, 2)
  gn = ((g - g.mean(-1, keepdims=True)) / jnp.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(-1, 8)
  ref = params["resnets_0"]["norm2"]["scale"] * jnp.maximum(jnp.mean(jnp.maximum(gn, 1.0), 0), 1.0)
  np.testing.assert_allclose(f["resnets_0"], ref, rtol=1e-4)
  # folding keeps the float function: smoothed kernel rows, run-time divisor
  sm = smoothing_pass({"min_factor": 0.0})(qm, data)
  np.testing.assert_allclose(sm.qstate["resnets_0/conv2"].smooth, ref, rtol=1e-4)
  xx, tt = data.xs[1][:4], jnp.full((4,), data.ts[1])
  out = qapply.quantized_apply(model, sm.plan, sm.params, sm.qstate, xx, tt, None, t=tt)
  np.testing.assert_allclose(out, model.apply({"params": params}, xx, tt), atol=1e-4)


def test_inter_step_estimate_and_hold():
  model, params, ex = cn.mini()
  e = cn.env(4)
  qm = cn.qmodel(model, params, ex, e)
  const = lambda x, t, c=None: jnp.full_like(x, 0.5)          # a denoiser whose noise has mean 0.5
  mu, ts = renoise_means(qm, num_samples=8, seed=0, denoise_q=const)
  assert mu.shape == (4,) and np.all(np.abs(mu - 0.5) < 0.1)
  assert held_estimates(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 2).tolist() == [0.0, 2.0, 2.0, 4.0, 4.0]
  assert held_estimates(np.array([1.0, np.nan, 3.0]), 1).tolist() == [1.0, 1.0, 3.0]
  # PLMS evaluates its second timestep twice: no re-noising is possible there
  qp = cn.qmodel(model, params, ex, cn.env(4, "plms"))
  mu_p, _ = renoise_means(qp, num_samples=4, seed=0, denoise_q=const)
  assert np.isnan(mu_p[1]) and np.isfinite(mu_p[0])


def test_recipe_smooths_and_corrects():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  qm = recipe.build("qncd", {"stats_samples": 8, "interval": 2})(model, params, ex, data, w_bits=8, a_bits=8, env=e)
  assert qm.qstate["resnets_0/conv2"].smooth is not None and qm.meta["qncd_smoothed"] == ["resnets_0"]
  shift = np.asarray(qm.corrections[0].state["shift"])
  assert shift[0] == 0.0 and shift[1] == shift[2] and shift[1] != 0.0        # estimated at 1, held at 2
