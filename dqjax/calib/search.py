"""Compiled range searches. Every search works on `rows` [R, N]: one row per quantization parameter (a
channel, a group, or the whole tensor), so a per-channel search is one vectorised call, never a loop.
Searches return per-row clipping ranges (lo [R], hi [R]); `params_for` turns them into `QParams`.

One-shot searches (weights, or activations small enough to hold):
- `minmax_range`, `percentile_range` (two-sided);
- `mse_range`: the LAPQ / Q-Diffusion shrink grid lo·r, hi·r with r = max(1 − i/C, min_ratio), picking the
  argmin of Σ|x − Q(x)|^p per row. The quantizer is the spec's own (int sym/asym/unsigned, ternary,
  float formats). Binary specs have no range: the scale α is searched over α = 2·mean|x|·r (the L2 optimum
  mean|x| is the candidate r = ½) and returned as (−α, α);
- `kl_range`: TensorRT entropy calibration, see `kl_from_hist`;
- `omse_range`: OMSE (Choukroun et al. 2019) — the clipping minimising the L2 error, found by a coarse
  shrink grid followed by a fine grid around its best (no golden section: the L2 error of a quantizer is
  not unimodal in the clipping value, and a grid is as cheap under vmap).

Streaming versions for activations seen over many batches (never stored): after a first min/max pass
gives per-row base ranges, `accumulate_errors` adds, for every candidate of the same shrink grid, the
error Σ|x − Q_c(x)|^p, and `finalize_errors` picks the best; `accumulate_hist` builds per-row histograms
over the base range for `kl_from_hist` and `percentile_from_hist`. All functions are jit-compatible with
the spec, candidate counts and bin counts static. Candidate loops run as `lax.map` in vectorised chunks
bounded to about `_BUDGET` elements, so large per-channel weights do not materialise C copies.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.quant import ops as qops
from dqjax.quant.spec import BINARY, TERNARY, QuantSpec

Array = jax.Array
_BUDGET = 1 << 23   # elements materialised at once by a chunked candidate map (32 MB of float32)


# --- rows -----------------------------------------------------------------------------------------
def to_rows(x: Array, reduce_axes) -> Array:
  """Move the kept axes first (in order) and flatten: [prod(kept), prod(reduced)]."""
  reduce_axes = tuple(sorted(a % x.ndim for a in reduce_axes))
  keep = [i for i in range(x.ndim) if i not in reduce_axes]
  xt = jnp.transpose(x, keep + list(reduce_axes))
  r = int(np.prod([x.shape[i] for i in keep], dtype=np.int64))
  return xt.reshape(r, -1)


def from_rows(values: Array, x_shape, reduce_axes) -> Array:
  """Per-row values [R] back to a keepdims array broadcastable against x."""
  reduce_axes = tuple(a % len(x_shape) for a in reduce_axes)
  return jnp.reshape(values, tuple(1 if i in reduce_axes else d for i, d in enumerate(x_shape)))


def row_spec(spec: QuantSpec) -> QuantSpec:
  """The spec applied to rows with per-row parameters [R, 1]."""
  return spec.replace(granularity="tensor", axis=-1, group_size=None, dynamic=False)


def params_for(rows_range, spec: QuantSpec, x_shape=None, reduce_axes=None) -> qops.QParams:
  """QParams from per-row ranges (lo [R], hi [R]) via `ops.params_from_range` (binary: scale = hi).

  Without `x_shape` the parameters are shaped [R, 1] (for fake-quantizing the rows); with `x_shape` and
  `reduce_axes` they are keepdims arrays for the tensor the rows came from.
  """
  lo, hi = rows_range
  if x_shape is None:
    lo, hi = lo[:, None], hi[:, None]
  else:
    lo, hi = from_rows(lo, x_shape, reduce_axes), from_rows(hi, x_shape, reduce_axes)
  if spec.format == BINARY:
    return qops.QParams(scale=jnp.maximum(hi, 1e-8))
  return qops.params_from_range(lo, hi, row_spec(spec) if x_shape is None else spec)


def row_error(rows: Array, lo: Array, hi: Array, spec: QuantSpec, p: float = 2.0) -> Array:
  """Σ_n |x − Q(x; [lo, hi])|^p per row, for per-row ranges lo, hi [R] (binary: α = hi)."""
  rows = rows.astype(jnp.float32)
  qp = params_for((lo, hi), spec)
  d = jnp.abs(qops.fake_quant(rows, qp, row_spec(spec)) - rows)
  return jnp.sum(d * d if isinstance(p, (int, float)) and p == 2 else d ** p, axis=1)   # p may be traced


def _chunk(n_items: int, per_item: int) -> int:
  return int(max(1, min(n_items, _BUDGET // max(per_item, 1))))


def _map(fn, xs, per_item: int):
  """vmap over the leading axis when it fits the budget (one body to compile), else chunked lax.map."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  batch = _chunk(n, per_item)
  return jax.vmap(fn)(xs) if batch >= n else jax.lax.map(fn, xs, batch_size=batch)


def candidate_errors(rows: Array, lo_c: Array, hi_c: Array, spec: QuantSpec, p: float = 2.0) -> Array:
  """Errors [C, R] of candidate ranges lo_c, hi_c [C, R] (vectorised in chunks over candidates)."""
  rows = rows.astype(jnp.float32)
  fn = lambda lh: row_error(rows, lh[0], lh[1], spec, p)
  return _map(fn, (lo_c, hi_c), rows.size)


def shrink_ratios(num_candidates: int, min_ratio: float = 0.01) -> Array:
  """The LAPQ grid r_i = max(1 − i/C, min_ratio), i = 0..C−1 (r_0 = 1: the base range itself)."""
  if num_candidates < 1:
    raise ValueError(f"num_candidates={num_candidates} must be a positive integer")
  return jnp.maximum(1.0 - jnp.arange(num_candidates, dtype=jnp.float32) / num_candidates, min_ratio)


def binary_base(rows: Array) -> tuple[Array, Array]:
  """Base 'range' of a binary quantizer: (−2·mean|x|, 2·mean|x|), so the shrink grid scans α around
  the L2-optimal mean|x|."""
  m = jnp.mean(jnp.abs(rows.astype(jnp.float32)), axis=1)
  return -2.0 * m, 2.0 * m


def base_range(rows: Array, spec: QuantSpec) -> tuple[Array, Array]:
  """What a first pass provides: min/max per row (binary: `binary_base`)."""
  return binary_base(rows) if spec.format == BINARY else minmax_range(rows)


# --- one-shot searches --------------------------------------------------------------------------------
def minmax_range(rows: Array) -> tuple[Array, Array]:
  return jnp.min(rows, axis=1), jnp.max(rows, axis=1)


def percentile_range(rows: Array, q: float = 99.99) -> tuple[Array, Array]:
  """Two-sided percentile clipping: [pct(100 − q), pct(q)] per row (linear interpolation)."""
  _check_q(q)
  rows = rows.astype(jnp.float32)
  return jnp.percentile(rows, 100.0 - q, axis=1), jnp.percentile(rows, q, axis=1)


def _check_q(q):
  if not 50.0 < float(q) <= 100.0:
    raise ValueError(f"percentile q={q!r} is out of range; accepted values: 50 < q <= 100 (e.g. 99.99)")


def mse_range(rows: Array, spec: QuantSpec, num_candidates: int = 100, p: float = 2.0,
              min_ratio: float = 0.01) -> tuple[Array, Array]:
  """The shrink grid lo·r, hi·r minimising Σ|x − Q(x)|^p per row (r = 1 is min/max: never worse)."""
  lo, hi = base_range(rows, spec)
  r = shrink_ratios(num_candidates, min_ratio)
  errs = candidate_errors(rows, r[:, None] * lo, r[:, None] * hi, spec, p)   # [C, R]
  best = r[jnp.argmin(errs, axis=0)]
  return lo * best, hi * best


def omse_range(rows: Array, spec: QuantSpec, num_candidates: int = 100, num_fine: int = 21,
               min_ratio: float = 0.01) -> tuple[Array, Array]:
  """OMSE: L2-optimal clipping by a coarse shrink grid of `num_candidates`, then `num_fine` (odd, so the
  coarse best is kept) ratios spanning ±1/C around the coarse best. Never worse than `mse_range` at p=2."""
  lo, hi = base_range(rows, spec)
  coarse = shrink_ratios(num_candidates, min_ratio)
  errs = candidate_errors(rows, coarse[:, None] * lo, coarse[:, None] * hi, spec, 2.0)
  best = coarse[jnp.argmin(errs, axis=0)]                                            # [R]
  nf = num_fine + (1 - num_fine % 2)
  offs = jnp.linspace(-1.0, 1.0, nf) / num_candidates
  offs = offs.at[nf // 2].set(0.0)                                                   # exactly the coarse best
  fine = jnp.clip(best[None, :] + offs[:, None], min_ratio / 2, 1.0)                 # [F, R]
  errs = candidate_errors(rows, fine * lo, fine * hi, spec, 2.0)
  pick = jnp.take_along_axis(fine, jnp.argmin(errs, axis=0)[None], axis=0)[0]
  return lo * pick, hi * pick


def kl_range(rows: Array, spec: QuantSpec, num_bins: int = 2048, num_candidates: int = 128,
             min_ratio: float = 1.0 / 16) -> tuple[Array, Array]:
  """Entropy (KL) calibration per row, one-shot: build the histogram, then `kl_from_hist`.

  Symmetric specs (see `kl_from_hist`) get a signed histogram of 2·num_bins bins over the symmetric range
  [−max|x|, max|x|], which folds exactly into an |x| histogram of `num_bins` bins (TensorRT's 2048 |x|
  bins by default); asymmetric / unsigned specs a signed histogram of `num_bins` over
  [min(x, 0), max(x, 0)]. To reproduce this from streamed histograms, accumulate over the same ranges.
  """
  rows = rows.astype(jnp.float32)
  lo, hi = kl_base_range(rows, spec)
  bins = 2 * num_bins if _kl_mode(spec) == "abs" else num_bins
  hist = accumulate_hist(init_hist(rows.shape[0], bins), rows, lo, hi)
  fn = lambda a: kl_from_hist(a[0], a[1], a[2], spec, num_candidates=num_candidates, min_ratio=min_ratio)
  return _map(fn, (hist, lo, hi), 8 * num_candidates * bins)


def kl_base_range(rows: Array, spec: QuantSpec) -> tuple[Array, Array]:
  """The histogram range `kl_range` uses: [−max|x|, max|x|] for symmetric specs, [min(x,0), max(x,0)]
  otherwise."""
  lo, hi = minmax_range(rows.astype(jnp.float32))
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if _kl_mode(spec) == "abs":
    a = jnp.maximum(-lo, hi)
    lo, hi = -a, a
  return lo, hi


# --- streaming: errors per candidate -------------------------------------------------------------------
def init_error_state(num_rows: int, num_candidates: int) -> Array:
  """Accumulated errors [R, C] of the shrink-grid candidates."""
  return jnp.zeros((num_rows, num_candidates), jnp.float32)


def accumulate_errors(state: Array, rows: Array, lo: Array, hi: Array, spec: QuantSpec, p: float = 2.0,
                      min_ratio: float = 0.01) -> Array:
  """Add Σ|x − Q_c(x)|^p for every candidate c = (lo·r_c, hi·r_c) of the base range [lo, hi] [R] (from a
  first pass over all batches: `base_range`; binary: `binary_base`). Rows of every batch must be the same
  quantization parameters (same R)."""
  r = shrink_ratios(state.shape[1], min_ratio)
  errs = candidate_errors(rows, r[:, None] * lo, r[:, None] * hi, spec, p)   # [C, R]
  return state + errs.T


def finalize_errors(state: Array, lo: Array, hi: Array, min_ratio: float = 0.01) -> tuple[Array, Array]:
  """The best candidate range per row from accumulated errors [R, C] (or [C] for one row)."""
  r = shrink_ratios(state.shape[-1], min_ratio)
  best = r[jnp.argmin(state, axis=-1)]
  return lo * best, hi * best


def hist_supported(spec: QuantSpec) -> bool:
  """Whether `hist_errors` serves this spec: uniform integer grids only. Float grids have steps far narrower
  than a bin near zero; ternary and binary keep the exact streamed search."""
  return spec.format == "int"


def _abs_pow_antiderivative(z: Array, p: float) -> Array:
  """F(z) = sign(z)·|z|^(p+1)/(p+1), so that ∫_u^v |x − c|^p dx = F(v − c) − F(u − c)."""
  return jnp.sign(z) * jnp.abs(z) ** (p + 1.0) / (p + 1.0)


def hist_errors(hist: Array, lo: Array, hi: Array, spec: QuantSpec, num_candidates: int = 100,
                p: float = 2.0, min_ratio: float = 0.01) -> Array:
  """Errors [R, C] of the shrink-grid candidates estimated from per-row histograms [R, B] over [lo, hi].

  The streaming `accumulate_errors` costs C fake-quantizations of every activation element; this costs one
  histogram update per element and C·B work per row, which is what makes an MSE/Lp activation search
  affordable on a large model (ddpm-mnist: 605 s → 55 s per search on 2 CPU cores). The values of a bin are
  taken as uniformly spread over it, and Σ|x − Q(x)|^p is integrated exactly under that assumption: the
  quantizer is a step function whose breakpoints are the midpoints between levels, so a bin narrower than
  one step holds at most one breakpoint and splits into two pieces with a closed-form integral each. Bins
  wider than a step (only for candidates clipping to a tiny fraction of the range, r < levels/B) are
  treated as holding one breakpoint between their end levels, which overestimates their error. With the
  default 16384 bins that happens only for r < 1.6 % at 8 bits (0.1 % at 4 bits).
  """
  rows, bins = hist.shape
  h = hist.astype(jnp.float32)
  width = jnp.maximum(hi - lo, 1e-30) / bins                                         # [R]
  a = lo[:, None] + width[:, None] * jnp.arange(bins, dtype=jnp.float32)[None, :]   # left edges [R, B]
  b = a + width[:, None]
  weight = h / width[:, None]                                                        # density per bin
  rs = row_spec(spec)

  def one(ratio):
    qp = params_for((lo * ratio, hi * ratio), spec)                                  # [R, 1]
    qa, qb = qops.fake_quant(a, qp, rs), qops.fake_quant(b, qp, rs)
    m = jnp.clip(0.5 * (qa + qb), a, b)                                              # the breakpoint (if any)
    F = lambda z: _abs_pow_antiderivative(z, p)
    integral = F(m - qa) - F(a - qa) + F(b - qb) - F(m - qb)
    return jnp.sum(weight * integral, axis=1)                                        # [R]

  r = shrink_ratios(num_candidates, min_ratio)
  return _map(one, r, 8 * rows * bins).T


# --- streaming: histograms ------------------------------------------------------------------------------
def init_hist(num_rows: int, num_bins: int = 2048) -> Array:
  """Per-row histogram counts [R, bins] (int32: exact over many batches)."""
  return jnp.zeros((num_rows, num_bins), jnp.int32)


def accumulate_hist(state: Array, rows: Array, lo: Array, hi: Array) -> Array:
  """Add each row's values to its histogram over the fixed base range [lo, hi] [R] (equal-width bins;
  values outside land in the end bins — with a base range from a min/max pass there are none)."""
  r, bins = state.shape
  rows = rows.astype(jnp.float32)
  width = jnp.maximum(hi - lo, 1e-30)[:, None]
  idx = jnp.clip(jnp.floor((rows - lo[:, None]) / width * bins), 0, bins - 1).astype(jnp.int32)
  row_id = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[:, None], idx.shape)
  return state.at[row_id, idx].add(jnp.ones(idx.shape, state.dtype))


def percentile_from_hist(hist: Array, lo, hi, q: float = 99.99) -> tuple[Array, Array]:
  """Two-sided percentile range [pct(100 − q), pct(q)] of one row's histogram over [lo, hi].

  Uses numpy's rank convention (position (n − 1)·q/100 among the sorted values) and places the values of a
  bin evenly inside it, so the result lies within one bin width of the order statistics that bracket the
  exact percentile (in dense regions: within about a bin of `percentile_range`; in a sparse tail the exact
  value itself interpolates between samples that may be many bins apart)."""
  _check_q(q)
  h = hist.astype(jnp.float32)
  bins = h.shape[0]
  n = jnp.sum(h)
  cum = jnp.cumsum(h)
  prev = cum - h
  width = (hi - lo) / bins

  def at(frac):
    t = (n - 1.0) * frac                                 # 0-based position among the sorted values
    k = jnp.argmax(cum >= jnp.floor(t) + 1.0)            # the bin holding sorted value floor(t)
    inside = jnp.clip((t - prev[k] + 0.5) / jnp.maximum(h[k], 1.0), 0.0, 1.0)
    return lo + width * (k + inside)

  return at((100.0 - q) / 100.0), at(q / 100.0)


def _bin_centres(hist: Array, lo, hi) -> tuple[Array, Array, Array, Array, Array]:
  """A histogram over [lo, hi] as float32 (counts, lo, hi, bin width, bin centres)."""
  h = hist.astype(jnp.float32)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  width = jnp.maximum((hi - lo) / h.shape[0], 1e-30)
  return h, lo, hi, width, lo + width * (jnp.arange(h.shape[0], dtype=jnp.float32) + 0.5)


def fold_abs_hist(hist: Array, lo, hi) -> tuple[Array, Array]:
  """Fold a signed histogram over [lo, hi] into an |x| histogram over [0, bins·w]: (counts, w).

  The |x| bins are as wide as the signed ones — an exact mirror when lo = −hi, as `kl_range` builds it —
  or wider when [lo, hi] does not reach far below zero, so that [0, max(|lo|, |hi|)] always fits. A signed
  bin goes to the |x| bin holding |its centre|: off by at most one bin otherwise."""
  h, lo, hi, width, centers = _bin_centres(hist, lo, hi)
  bins = h.shape[0]
  top = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  a_width = jnp.maximum(width, top / bins)
  idx = jnp.clip(jnp.floor(jnp.abs(centers) / a_width), 0, bins - 1).astype(jnp.int32)
  return jax.ops.segment_sum(h, idx, bins), a_width


def _kl_mode(spec: QuantSpec) -> str:
  """'abs' (|x| histogram, one threshold), 'upper' (unsigned: clip above only), 'two_sided', 'binary'."""
  if spec.format == BINARY:
    return "binary"
  if spec.is_float or spec.format == TERNARY or (spec.symmetric and spec.signed):
    return "abs"
  if spec.symmetric and not spec.signed:
    return "upper"
  return "two_sided"


def _level_table(spec: QuantSpec) -> Optional[np.ndarray]:
  """Sorted distinct finite values of a float format's grid (bucket ids for KL)."""
  from dqjax.quant import packing
  t = packing.float_table(spec.format)
  return np.unique(t[np.isfinite(t)])   # ±0 collapse into one level


def _bucket_ids(x: Array, qp: qops.QParams, spec: QuantSpec) -> tuple[Array, int]:
  """Index of the quantization level each value of x goes to, and the number of levels."""
  rs = row_spec(spec)
  codes = qops.quantize(x, qp, rs)
  if spec.is_float:
    levels = _level_table(spec)
    return jnp.searchsorted(jnp.asarray(levels), codes).astype(jnp.int32), len(levels)
  return (codes - spec.qmin).astype(jnp.int32), int(spec.qmax - spec.qmin + 1)


def _kl_divergence(h: Array, centers: Array, c_lo, c_hi, spec: QuantSpec, eps: float = 1e-4) -> Array:
  """KL(P ‖ Q) of one candidate clipping [c_lo, c_hi] (the TensorRT / MXNet construction).

  P: the histogram restricted to bins whose centre lies in [c_lo, c_hi], with the mass outside added to
  the first / last such bin. Q: the same restricted histogram *without* the outliers, each quantization
  level's mass spread evenly over the level's bins where P is non-zero. Levels are those of the actual
  quantizer for this clipping (bins are grouped by the level their centre rounds to, so int, ternary and
  non-uniform float grids are all faithful). Zeros of Q where P > 0 are smoothed with `eps`.
  """
  inside = (centers >= c_lo) & (centers <= c_hi)
  any_inside = jnp.any(inside)
  sliced = jnp.where(inside, h, 0.0)
  below = jnp.sum(jnp.where(centers < c_lo, h, 0.0))
  above = jnp.sum(jnp.where(centers > c_hi, h, 0.0))
  n = h.shape[0]
  first = jnp.argmax(inside)
  last = n - 1 - jnp.argmax(inside[::-1])
  p = sliced.at[first].add(below).at[last].add(above)
  qp = qops.params_from_range(jnp.minimum(c_lo, 0.0), jnp.maximum(c_hi, 0.0), row_spec(spec))
  ids, num_levels = _bucket_ids(centers, qp, spec)
  nz = (p > 0) & inside
  mass = jax.ops.segment_sum(sliced, ids, num_levels)
  count = jax.ops.segment_sum(nz.astype(jnp.float32), ids, num_levels)
  q = jnp.where(nz, mass[ids] / jnp.maximum(count[ids], 1.0), 0.0)
  p_n = p / jnp.maximum(jnp.sum(p), 1e-30)
  q_n = q / jnp.maximum(jnp.sum(q), 1e-30)
  q_n = jnp.where(nz & (q_n <= 0), eps, q_n)
  q_n = q_n / jnp.maximum(jnp.sum(q_n), 1e-30)
  kl = jnp.sum(jnp.where(p_n > 0, p_n * (jnp.log(jnp.maximum(p_n, 1e-30)) - jnp.log(jnp.maximum(q_n, 1e-30))),
                         0.0))
  return jnp.where(any_inside, kl, jnp.inf)


def kl_from_hist(hist: Array, lo, hi, spec: QuantSpec, num_candidates: int = 128,
                 min_ratio: float = 1.0 / 16) -> tuple[Array, Array]:
  """Entropy calibration (TensorRT) from one row's histogram over [lo, hi]: the clipping minimising
  KL(P ‖ Q) between the clipped reference distribution and its quantized version (`_kl_divergence`).

  - symmetric specs (signed int, ternary, float formats): the signed histogram is folded into an |x|
    histogram of the same bin width (exact when [lo, hi] is symmetric, as `kl_range` builds it; within one
    bin otherwise) and one threshold T = max(|lo|, |hi|)·r is searched, r ∈ linspace(1, min_ratio, C);
    returns (−T, T);
  - unsigned int: the upper end hi·r is searched, the lower end stays at min(lo, 0);
  - asymmetric int: both ends are searched on a √C × √C grid (lo·r₁, hi·r₂);
  - binary: no clipping to choose; returns ±(histogram estimate of mean|x|), the L2-optimal binary scale.
  """
  h, lo, hi, width, centers = _bin_centres(hist, lo, hi)
  bins = h.shape[0]
  mode = _kl_mode(spec)
  if mode == "binary":
    m = jnp.sum(h * jnp.abs(centers)) / jnp.maximum(jnp.sum(h), 1.0)
    return -m, m
  if mode == "abs":
    top = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    h, a_width = fold_abs_hist(h, lo, hi)
    centers = a_width * (jnp.arange(bins, dtype=jnp.float32) + 0.5)
    r = jnp.linspace(1.0, min_ratio, num_candidates)
    c_lo, c_hi = jnp.zeros_like(r), top * r
  else:
    lo0, hi0 = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if mode == "upper":
      r = jnp.linspace(1.0, min_ratio, num_candidates)
      c_lo, c_hi = jnp.full_like(r, lo0), hi0 * r
    else:
      k = max(2, int(np.ceil(np.sqrt(num_candidates))))
      r = jnp.linspace(1.0, min_ratio, k)
      c_lo = jnp.broadcast_to((lo0 * r)[:, None], (k, k)).reshape(-1)
      c_hi = jnp.broadcast_to((hi0 * r)[None, :], (k, k)).reshape(-1)
  fn = lambda c: _kl_divergence(h, centers, c[0], c[1], spec)
  kls = _map(fn, (c_lo, c_hi), 8 * bins)
  b = jnp.argmin(kls)
  if mode == "abs":
    return -c_hi[b], c_hi[b]
  return c_lo[b], c_hi[b]
