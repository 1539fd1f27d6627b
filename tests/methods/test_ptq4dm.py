"""PTQ4DM: the NDTC calibration set is skewed toward the end of denoising as N(0.4, 0.4) says."""
import ml_collections
import numpy as np
import pytest

from dqjax.calib import calib_sets
from dqjax.methods import recipe
from dqjax.methods.ptq4dm import ndtc_counts, ndtc_set
from tests.methods.unet_ptq_nets import tiny_unet, trajectory


def test_ndtc_counts_follow_the_clipped_normal():
  s, n = 50, 20000
  counts = ndtc_counts(s, n, mu=0.4, sigma=0.4, seed=0)
  assert counts.sum() == n
  pos = (s - 1 - np.arange(s)) / s                    # position from the end of denoising, in [0, 1)
  # interior steps: frequencies match the normal density mass of their cell (clipping piles the tails
  # onto the first and last steps)
  from scipy.stats import norm
  cell = norm.cdf(pos[1:-1] + 1 / s, 0.4, 0.4) - norm.cdf(pos[1:-1], 0.4, 0.4)
  np.testing.assert_allclose(counts[1:-1] / n, cell, atol=0.006)
  assert counts[-1] / n == pytest.approx(norm.cdf(1 / s, 0.4, 0.4), abs=0.01)   # last step + left tail
  low_noise = counts[s // 2:].sum()
  # skewed toward the end (low t): P(position < 1/2) = Phi(0.25) ~ 0.60, against 0.5 for uniform steps
  assert low_noise / n == pytest.approx(norm.cdf(0.5, 0.4, 0.4), abs=0.01) and low_noise > 0.58 * n
  with pytest.raises(ValueError, match="sigma"):
    ndtc_counts(10, 10, sigma=0.0)


def test_ndtc_calibration_set_and_recipe():
  data = trajectory(steps=10, n=8)
  cfg = ml_collections.ConfigDict({"num_samples": 160, "chunk": 8, "mu": 0.4, "sigma": 0.4, "seed": 0})
  sel = ndtc_set(cfg)(None, data)
  hist = calib_sets.step_histogram(sel, data.ts)
  assert hist.sum() == 160
  ts = np.repeat(np.asarray(sel.ts), sel.num_samples)
  assert np.median(ts) < 500                           # most samples come from low-noise steps
  assert hist[5:].sum() > hist[:5].sum()
  # the recipe's plan: first/last layers at 8 bits, attention matmuls left in float (calibration itself
  # is the core's MSE search, tested there)
  model, params, ex = tiny_unet()
  qm = recipe.prepare(model, params, recipe.build("ptq4dm").rules(4, 8), ex)
  assert qm.plan["conv_out"].weight.bits == 8 and qm.plan["time_embedding/linear_1"].weight.bits == 8
  assert qm.plan["conv_in"].weight.bits == 4 and qm.plan["conv_in"].weight.symmetric
  assert not qm.plan["mid_block/attentions_0/qk_matmul"].quantized
