"""Calibration searches: MSE / OMSE never worse than min/max, KL and percentile clip heavy tails, streaming
equals one-shot, per-channel equals per-row, rows helpers and chunked candidate maps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqjax.calib import search
from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec

SPECS = [QuantSpec(bits=8), QuantSpec(bits=4), QuantSpec(bits=4, narrow_range=True),
         QuantSpec(bits=4, symmetric=False), QuantSpec(bits=3, symmetric=False), QuantSpec(bits=4, signed=False),
         QuantSpec("ternary"), QuantSpec("fp8_e4m3"), QuantSpec("fp6_e2m3"), QuantSpec("fp4_e2m1")]
SETTINGS = settings(max_examples=25, deadline=None)
R, N = 3, 96

# p is traced (not static) to share compilations between p = 2 and p = 2.4
MSE = jax.jit(search.mse_range, static_argnames=("spec", "num_candidates", "min_ratio"))
OMSE = jax.jit(search.omse_range, static_argnames=("spec", "num_candidates", "num_fine", "min_ratio"))
KL = jax.jit(search.kl_range, static_argnames=("spec", "num_bins", "num_candidates", "min_ratio"))
PCT = jax.jit(search.percentile_range, static_argnames=("q",))
ERR = jax.jit(search.row_error, static_argnames=("spec",))
ACC = jax.jit(search.accumulate_errors, static_argnames=("spec", "min_ratio"))
CAND = jax.jit(search.candidate_errors, static_argnames=("spec",))
HIST = jax.jit(search.accumulate_hist)
KL_H = jax.jit(jax.vmap(search.kl_from_hist, in_axes=(0, 0, 0, None, None)), static_argnums=(3, 4))


def _data(seed, kind, shape=(R, N)):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    x = rng.standard_normal(shape)
  elif kind == "heavy":
    x = rng.standard_t(1.5, shape)
  elif kind == "skewed":
    x = rng.exponential(1.0, shape) - 0.3
  else:        # per-row scales spanning orders of magnitude
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, size=(shape[0], 1))
  return jnp.asarray(x.astype(np.float32))


def _err(rows, rng_, spec, p=2.0):
  return np.asarray(ERR(rows, rng_[0], rng_[1], spec=spec, p=jnp.float32(p)))


def _same_or_as_good(rows, got, ref, spec, p, rtol=1e-5):
  """Ranges equal (rtol 1e-6), or — where float summation order flipped a near-tie of the argmin — the
  picked range's error within `rtol` of the reference's."""
  same = np.isclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=1e-6, atol=0)
  e_got, e_ref = _err(rows, got, spec, p), _err(rows, ref, spec, p)
  assert np.all(same | (np.abs(e_got - e_ref) <= rtol * np.abs(e_ref) + 1e-12)), (got, ref, e_got, e_ref)


# --- rows ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0, 2), (1,), (0, 1, 2), (2,), (-1, 0)])
def test_to_rows_from_rows_round_trip(axes):
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) * jnp.array([1.0, -1.0, 0.5, 2.0])
  rows = search.to_rows(x, axes)
  kept = [d for i, d in enumerate(x.shape) if i not in {a % 3 for a in axes}]
  assert rows.shape == (int(np.prod(kept)), x.size // int(np.prod(kept)))
  ax = tuple(a % 3 for a in axes)
  np.testing.assert_array_equal(np.asarray(search.from_rows(jnp.max(rows, 1), x.shape, axes)),
                                np.asarray(jnp.max(x, axis=ax, keepdims=True)))


def test_params_for_matches_tensor_params():
  spec = QuantSpec(bits=4, symmetric=False, granularity="channel", axis=-1)
  x = _data(0, "scales", (6, 5))
  axes = qops.reduce_axes(spec, x.ndim)
  rows = search.to_rows(x, axes)                                       # [5 channels, 6]
  rng_ = search.mse_range(rows, spec)
  qp_t = search.params_for(rng_, spec, x.shape, axes)
  assert qp_t.scale.shape == (1, 5) and qp_t.zero_point.shape == (1, 5)
  qp_r = search.params_for(rng_, spec)
  assert qp_r.scale.shape == (5, 1)
  np.testing.assert_array_equal(np.asarray(qops.fake_quant(x, qp_t, spec)).T,
                                np.asarray(qops.fake_quant(rows, qp_r, search.row_spec(spec))))
  qb = search.params_for((-rng_[1], rng_[1]), QuantSpec("binary"))
  np.testing.assert_array_equal(np.asarray(qb.scale)[:, 0], np.maximum(np.asarray(rng_[1]), 1e-8))


# --- one-shot searches ----------------------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from(SPECS), st.sampled_from([2.0, 2.4]), st.sampled_from(["normal", "heavy", "skewed", "scales"]),
       st.integers(0, 2 ** 32 - 1))
def test_mse_and_omse_never_worse_than_minmax(spec, p, kind, seed):
  rows = _data(seed, kind)
  e_mm = _err(rows, search.minmax_range(rows), spec, p)
  e_mse = _err(rows, MSE(rows, spec=spec, num_candidates=40, p=jnp.float32(p)), spec, p)
  assert np.all(e_mse <= e_mm * (1 + 1e-6) + 1e-12), (e_mse, e_mm)
  if p == 2.0:   # OMSE refines the same coarse grid at p = 2
    e_omse = _err(rows, OMSE(rows, spec=spec, num_candidates=40), spec, 2.0)
    assert np.all(e_omse <= e_mse * (1 + 1e-6) + 1e-12), (e_omse, e_mse)


def test_mse_clips_laplace_data_at_low_bits():
  # (with extreme outliers, e.g. Student-t(1.5), clipping them costs more than it saves: MSE keeps max)
  rows = jnp.asarray(np.random.default_rng(1).laplace(size=(2, 2000)).astype(np.float32))
  for spec in (QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False), QuantSpec("fp4_e2m1")):
    e_mm = _err(rows, search.minmax_range(rows), spec)
    lo, hi = MSE(rows, spec=spec)
    assert np.all(np.asarray(hi) < 0.9 * np.asarray(jnp.max(rows, 1))), spec
    assert np.all(_err(rows, (lo, hi), spec) < 0.9 * e_mm), spec


def test_binary_scale_search_is_l2_optimal_on_its_grid():
  spec = QuantSpec("binary")
  rows = _data(2, "skewed", (4, 500))
  lo, hi = MSE(rows, spec=spec)
  np.testing.assert_array_equal(np.asarray(lo), -np.asarray(hi))
  m = np.mean(np.abs(np.asarray(rows)), axis=1)
  assert np.all((np.asarray(hi) >= 0.02 * m * 0.999) & (np.asarray(hi) <= 2 * m * 1.001))
  # mean|x| (the L2 optimum of α·sign(x)) is on the grid (r = 1/2), so the search finds it
  e_opt = _err(rows, (-m, m), spec)
  e = _err(rows, (lo, hi), spec)
  np.testing.assert_allclose(e, e_opt, rtol=1e-5)
  lo_k, hi_k = KL(rows, spec=spec)            # KL has nothing to clip for binary: the histogram mean|x|
  np.testing.assert_allclose(np.asarray(hi_k), m, rtol=0.01)


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False), QuantSpec(bits=4),
                                  QuantSpec(bits=8, signed=False), QuantSpec("fp4_e2m1")])
def test_kl_and_percentile_clip_heavy_tailed_data(spec):
  # (fp8's dynamic range covers these tails: KL then keeps nearly the whole range, rightly)
  rows = _data(3, "heavy", (2, 4096))
  if not spec.signed:
    rows = jnp.abs(rows)
  mx = np.asarray(jnp.max(jnp.abs(rows), axis=1))
  lo, hi = KL(rows, spec=spec)
  assert np.all(np.maximum(-np.asarray(lo), np.asarray(hi)) < 0.5 * mx), (lo, hi, mx)
  assert np.all(np.asarray(hi) > 0)
  plo, phi = PCT(rows, q=99.9)
  assert np.all(np.asarray(phi) < 0.5 * mx) and np.all(np.asarray(plo) > -0.5 * mx)
  np.testing.assert_allclose(np.asarray(phi), np.percentile(np.asarray(rows), 99.9, axis=1), rtol=1e-5)


def test_kl_on_gaussian_data_matches_the_tensorrt_ballpark():
  # TensorRT-style entropy calibration of N(0, 1) at int8 clips around 4σ (below the max ≈ 4.9σ here)
  rows = jnp.asarray(np.random.default_rng(0).standard_normal((1, 100_000)).astype(np.float32))
  _, hi = KL(rows, spec=QuantSpec(bits=8))
  assert 3.0 < float(hi[0]) < float(jnp.max(jnp.abs(rows)))
  # fewer levels → tighter clipping
  _, hi4 = KL(rows, spec=QuantSpec(bits=4))
  assert float(hi4[0]) < float(hi[0])


# --- streaming ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from(SPECS + [QuantSpec("binary")]), st.sampled_from([2.0, 2.4]),
       st.sampled_from(["normal", "heavy", "skewed", "scales"]), st.integers(0, 2 ** 32 - 1))
def test_streaming_errors_equal_the_one_shot_search(spec, p, kind, seed):
  rows = _data(seed, kind)
  lo, hi = search.base_range(rows, spec)                     # the first (min/max) pass
  c = 40
  state = search.init_error_state(R, c)
  for b in range(3):                                         # three batches of the same rows
    state = ACC(state, rows[:, b * (N // 3):(b + 1) * (N // 3)], lo, hi, spec=spec, p=jnp.float32(p))
  got = search.finalize_errors(state, lo, hi)
  ref = MSE(rows, spec=spec, num_candidates=c, p=jnp.float32(p))
  _same_or_as_good(rows, got, ref, spec, p)
  # calibrate.py reduces a leading entry axis with vmap
  stacked = jax.vmap(search.finalize_errors)(state[None], lo[None], hi[None])
  np.testing.assert_array_equal(np.asarray(stacked[1][0]), np.asarray(got[1]))


HIST_ERR = jax.jit(search.hist_errors, static_argnames=("spec", "num_candidates", "p", "min_ratio"))


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([QuantSpec(bits=8), QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False),
                        QuantSpec(bits=3, symmetric=False), QuantSpec(bits=4, signed=False)]),
       st.sampled_from([2.0, 2.4]), st.sampled_from(["normal", "heavy", "skewed", "scales"]),
       st.integers(0, 2 ** 32 - 1))
def test_histogram_errors_match_the_exact_candidate_errors(spec, p, kind, seed):
  """The histogram estimate of every candidate's error is within 1 % of the exact sum wherever that
  error is not negligible, and the candidate it picks is as good as the exact search's to 1 %."""
  rows = _data(seed, kind, (2, 20000))
  lo, hi = search.base_range(rows, spec)
  c = 50
  exact = np.asarray(ACC(search.init_error_state(2, c), rows, lo, hi, spec=spec, p=jnp.float32(p)))
  hist = HIST(search.init_hist(2, 16384), rows, lo, hi)
  est = np.asarray(HIST_ERR(hist, lo, hi, spec=spec, num_candidates=c, p=p))
  scale = exact.min(axis=1, keepdims=True)
  assert np.all(np.abs(est - exact) <= 1e-2 * exact + 1e-3 * scale)
  picked = exact[np.arange(2), est.argmin(axis=1)]
  assert np.all(picked <= 1.01 * exact.min(axis=1))


def test_histogram_errors_serve_only_uniform_integer_grids():
  assert search.hist_supported(QuantSpec(bits=4))
  assert not any(search.hist_supported(s) for s in (QuantSpec("fp8_e4m3"), QuantSpec("ternary"),
                                                    QuantSpec("binary")))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=4, signed=False),
                        QuantSpec("fp4_e2m1")]),
       st.sampled_from(["normal", "heavy", "skewed"]), st.integers(0, 2 ** 32 - 1))
def test_streaming_histogram_equals_the_one_shot_kl(spec, kind, seed):
  rows = _data(seed, kind, (2, 600))
  bins, cands = 128, 32
  lo, hi = search.kl_base_range(rows, spec)        # from a first min/max pass
  symmetric = spec.is_float or spec.format == "ternary" or (spec.symmetric and spec.signed)
  if symmetric:
    np.testing.assert_array_equal(np.asarray(lo), -np.asarray(hi))
  stream_bins = 2 * bins if symmetric else bins   # kl_range folds 2·bins signed bins into bins |x| bins
  hist = search.init_hist(2, stream_bins)
  for b in range(3):
    hist = HIST(hist, rows[:, b * 200:(b + 1) * 200], lo, hi)
  one = HIST(search.init_hist(2, stream_bins), rows, lo, hi)
  np.testing.assert_array_equal(np.asarray(hist), np.asarray(one))       # counts are exact (int32)
  assert int(hist.sum()) == rows.size
  got = KL_H(hist, lo, hi, spec, cands)
  ref = KL(rows, spec=spec, num_bins=bins, num_candidates=cands)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99])
def test_percentile_from_hist_is_within_a_bin_of_the_bracketing_order_statistics(q):
  rows = _data(5, "normal", (2, 20_000))
  lo, hi = search.minmax_range(rows)
  hist = HIST(search.init_hist(2, 2048), rows, lo, hi)
  got = jax.vmap(lambda h, l, u: search.percentile_from_hist(h, l, u, q))(hist, lo, hi)
  ref = PCT(rows, q=q)
  width = np.asarray(hi - lo) / 2048
  v = np.sort(np.asarray(rows), axis=1)
  n = v.shape[1]
  for side, frac in ((0, (100 - q) / 100), (1, q / 100)):
    j = int(np.floor((n - 1) * frac))
    g = np.asarray(got[side])
    assert np.all(g >= v[:, j] - width - 1e-6) and np.all(g <= v[:, min(j + 1, n - 1)] + width + 1e-6)
    # numpy's value is bracketed by the same order statistics
    assert np.all(np.abs(g - np.asarray(ref[side])) <= np.abs(v[:, min(j + 1, n - 1)] - v[:, j]) + width + 1e-6)


def test_fold_abs_hist():
  rows = _data(4, "skewed", (1, 5000))
  a = float(jnp.max(jnp.abs(rows)))
  # symmetric base: the fold is exactly the |x| histogram with the same bin width
  fold = jax.jit(search.fold_abs_hist)
  signed = HIST(search.init_hist(1, 512), rows, jnp.array([-a]), jnp.array([a]))
  folded, w = fold(signed[0], -a, a)
  direct = np.histogram(np.abs(np.asarray(rows[0])), bins=256, range=(0, a))[0]
  np.testing.assert_allclose(float(w), a / 256, rtol=1e-6)
  # (np.histogram and the fold may disagree on values within float rounding of a bin edge)
  assert np.abs(np.asarray(folded[:256]) - direct).sum() <= 4
  assert float(folded[256:].sum()) == 0
  # min/max base (what calibrate.py streams): mass kept, every count at most one bin away
  lo, hi = search.minmax_range(rows)
  signed = HIST(search.init_hist(1, 512), rows, lo, hi)
  folded, w = fold(signed[0], lo[0], hi[0])
  assert float(folded.sum()) == rows.size
  direct = np.histogram(np.abs(np.asarray(rows[0])), bins=512, range=(0, 512 * float(w)))[0]
  cf, cd = np.cumsum(np.asarray(folded)), np.cumsum(direct)
  assert np.all(cf[1:] >= cd[:-1]) and np.all(cd[1:] >= cf[:-1])
  # and KL from the streamed (min/max) histogram lands near the one-shot KL
  s_lo, s_hi = KL_H(HIST(search.init_hist(1, 512), rows, lo, hi), lo, hi, QuantSpec(bits=8), 64)
  _, r_hi = KL(rows, spec=QuantSpec(bits=8), num_bins=256, num_candidates=64)
  assert float(s_lo[0]) == -float(s_hi[0])
  assert abs(float(s_hi[0]) - float(r_hi[0])) <= 0.25 * float(r_hi[0])


# --- per-channel = per-row ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False), QuantSpec("fp4_e2m1")])
@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["normal", "heavy", "scales"]), seed=st.integers(0, 2 ** 32 - 1))
def test_per_channel_search_equals_per_tensor_search_per_row(spec, kind, seed):
  rows = _data(seed, kind)
  all_mse = MSE(rows, spec=spec, num_candidates=40)
  all_omse = OMSE(rows, spec=spec, num_candidates=40)
  all_kl = KL(rows, spec=spec, num_bins=256, num_candidates=32)
  all_pct = PCT(rows, q=99.0)
  for i in range(R):
    row = rows[i:i + 1]
    pick = lambda r: (r[0][i:i + 1], r[1][i:i + 1])
    _same_or_as_good(row, pick(all_mse), MSE(row, spec=spec, num_candidates=40), spec, 2.0)
    _same_or_as_good(row, pick(all_omse), OMSE(row, spec=spec, num_candidates=40), spec, 2.0)
    one_kl = KL(row, spec=spec, num_bins=256, num_candidates=32)
    np.testing.assert_allclose(np.asarray(pick(all_kl)), np.asarray(one_kl), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pick(all_pct)), np.asarray(PCT(row, q=99.0)), rtol=1e-6)


def test_chunked_candidate_map_equals_one_vectorised_call(monkeypatch):
  rows = _data(6, "heavy", (4, 64))
  spec = QuantSpec(bits=4, symmetric=False)
  r = search.shrink_ratios(20)
  lo, hi = search.minmax_range(rows)
  full = CAND(rows, r[:, None] * lo, r[:, None] * hi, spec=spec, p=2.4)
  monkeypatch.setattr(search, "_BUDGET", rows.size * 3)       # chunks of 3 candidates (and a remainder)
  chunked = jax.jit(search.candidate_errors, static_argnames=("spec",))(rows, r[:, None] * lo, r[:, None] * hi,
                                                                         spec=spec, p=2.4)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-6)
  assert full.shape == (20, 4)


def test_bad_arguments_name_the_field():
  rows = _data(7, "normal", (1, 10))
  with pytest.raises(ValueError, match=r"percentile q=40.*accepted values: 50 < q <= 100"):
    search.percentile_range(rows, 40.0)
  with pytest.raises(ValueError, match="num_candidates=0 must be a positive integer"):
    search.mse_range(rows, QuantSpec(bits=8), num_candidates=0)
