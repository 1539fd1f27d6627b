"""TaC-QDM: NER recovers a planted per-channel gain; IBC removes a planted input bias of the quantized
trajectory through an ε shift at the previous call."""
import jax.numpy as jnp
import numpy as np

from dqjax.calib import noise_stats as ns
from dqjax.methods import recipe
from dqjax.methods.tac_qdm import input_bias_shifts
from tests.methods import correction_nets as cn


def test_ner_gain_and_input_bias_correction():
  model, params, ex = cn.mini()
  e = cn.env(4)
  qm = cn.qmodel(model, params, ex, e)
  fp = qm.denoiser("fp")
  gain = jnp.array([1.2, 0.8])
  pairs = ns.collect(qm, 8, seed=0, denoise_q=lambda x, t, c=None: gain * fp(x, t, c))
  scale = ns.masked_channel_scale(pairs.eps_q, pairs.eps_fp, keep=0.5)
  np.testing.assert_allclose(scale, jnp.broadcast_to(1 / gain, (4, 2)), rtol=1e-4)
  # a bias on the first (noisiest) call's output shifts every later input; IBC removes it
  bias = jnp.array([0.3, -0.2])
  biased = lambda x, t, c=None: fp(x, t, c) + jnp.where(t[:, None, None, None] > 700, bias, 0.0)
  pairs_b = ns.collect(qm, 8, seed=0, denoise_q=biased)
  shift, biases = input_bias_shifts(qm, pairs_b, jnp.ones((4, 2)), num_samples=8, seed=0, denoise_q=biased)
  np.testing.assert_allclose(biases[1], pairs_b.coef[0] * bias, rtol=1e-3)    # x̂_1 − x_1 = c_0 · b
  np.testing.assert_allclose(shift[0], -bias, rtol=1e-3)                     # the shift at call 0 undoes it
  from dqjax.methods._correction import affine_correction
  corr = affine_correction("tac_qdm", pairs_b.ts, shift=shift)
  x, conds, key = ns.initial_state(qm, 8, 0)
  ref = ns.sample_fn(qm, fp)(x, conds, key).trajectory.xs
  raw = ns.sample_fn(qm, biased)(x, conds, key).trajectory.xs
  fixed = ns.sample_fn(qm, biased, correction=corr)(x, conds, key).trajectory.xs
  mean_off = lambda a: float(jnp.max(jnp.abs(jnp.mean(a - ref, axis=(1, 2, 3)))))
  assert mean_off(fixed) < 0.05 * mean_off(raw)


def test_recipe_attaches_correction():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  qm = recipe.build("tac_qdm", {"stats_samples": 8})(model, params, ex, data, w_bits=4, a_bits=8, env=e)
  st = qm.corrections[0].state
  assert qm.corrections[0].name == "tac_qdm" and st["scale"].shape == (4, 2) and st["shift"].shape == (4, 2)
  assert float(jnp.max(jnp.abs(st["shift"][-1]))) == 0.0      # nothing follows the last call
  assert qm.plan["attn1/qk_matmul"].quantized
