"""Compiled range searches. Every search works on `rows` [R, N]: one row per quantization parameter (a
channel, a group, or the whole tensor), so per-channel searches are one vectorised call, never a loop.

One-shot searches (weights, or activations small enough to hold): minmax, percentile, mse (the LAPQ /
Q-Diffusion shrink grid), kl (TensorRT entropy calibration), omse (L2-optimal clipping: a coarse grid then
a fine grid around its best). Streaming versions for activations seen over many batches accumulate, for
each candidate clipping range, the Lp error (`*_errors`) or a histogram (`*_hist`), so activations are
never stored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dqjax.quant import ops as qops
from dqjax.quant.spec import BINARY, QuantSpec


# --- rows -----------------------------------------------------------------------------------------
def to_rows(x: jax.Array, reduce_axes) -> jax.Array:
  """Move the kept axes first and flatten: [prod(kept), prod(reduced)]."""
  reduce_axes = tuple(a % x.ndim for a in reduce_axes)
  keep = [i for i in range(x.ndim) if i not in reduce_axes]
  xt = jnp.transpose(x, keep + list(reduce_axes))
  r = 1
  for i in keep:
    r *= x.shape[i]
  return xt.reshape(r, -1)


def from_rows(values: jax.Array, x_shape, reduce_axes) -> jax.Array:
  """Per-row values back to a keepdims array broadcastable against x."""
  reduce_axes = tuple(a % len(x_shape) for a in reduce_axes)
  return values.reshape(tuple(1 if i in reduce_axes else d for i, d in enumerate(x_shape)))


def _row_spec(spec: QuantSpec) -> QuantSpec:
  """The spec applied to rows with per-row parameters [R, 1]."""
  return spec.replace(granularity="tensor", axis=-1, group_size=None, dynamic=False)


def row_error(rows, lo, hi, spec: QuantSpec, p: float) -> jax.Array:
  """Σ_n |x − Q(x; [lo, hi])|^p per row, for per-row ranges lo, hi [R]."""
  rs = _row_spec(spec)
  if spec.format == BINARY:
    qp = qops.QParams(scale=jnp.maximum(hi, 1e-8)[:, None])
  else:
    qp = qops.params_from_range(lo[:, None], hi[:, None], rs)
  return jnp.sum(jnp.abs(qops.fake_quant(rows, qp, rs) - rows) ** p, axis=1)


def _ratios(num_candidates: int, min_ratio: float = 0.01):
  """Shrink factors 1, 1−δ, ..., down to max(min_ratio, ...): the LAPQ grid."""
  return jnp.maximum(1.0 - jnp.arange(num_candidates, dtype=jnp.float32) / num_candidates, min_ratio)


# --- one-shot searches --------------------------------------------------------------------------------
def minmax_range(rows):
  return jnp.min(rows, axis=1), jnp.max(rows, axis=1)


def percentile_range(rows, q: float = 99.99):
  """Two-sided percentile clipping: [pct(100−q), pct(q)] per row."""
  return jnp.percentile(rows, 100.0 - q, axis=1), jnp.percentile(rows, q, axis=1)


def _binary_base(rows):
  m = jnp.mean(jnp.abs(rows), axis=1)
  return -2 * m, 2 * m   # candidate scales α ∈ (0, 2·mean|x|]


def mse_range(rows, spec: QuantSpec, num_candidates: int = 100, p: float = 2.0, min_ratio: float = 0.01):
  """The shrink grid lo·(1−i/C), hi·(1−i/C) minimising mean |x − Q(x)|^p per row (vectorised)."""
  lo, hi = _binary_base(rows) if spec.format == BINARY else minmax_range(rows)
  r = _ratios(num_candidates, min_ratio)
  errs = jax.vmap(lambda a: row_error(rows, lo * a, hi * a, spec, p))(r)   # [C, R]
  best = r[jnp.argmin(errs, axis=0)]
  return lo * best, hi * best


def omse_range(rows, spec: QuantSpec, num_candidates: int = 100):
  """L2-optimal clipping (OMSE): a coarse shrink grid, then a fine grid of the same size around its best."""
  lo, hi = _binary_base(rows) if spec.format == BINARY else minmax_range(rows)
  coarse = _ratios(num_candidates)
  errs = jax.vmap(lambda a: row_error(rows, lo * a, hi * a, spec, 2.0))(coarse)
  best = coarse[jnp.argmin(errs, axis=0)]                                  # [R]
  step = 1.0 / num_candidates
  fine = best[None, :] + jnp.linspace(-step, step, num_candidates)[:, None]  # [C, R]
  fine = jnp.clip(fine, 0.005, 1.0)
  errs = jax.vmap(lambda a: row_error(rows, lo * a, hi * a, spec, 2.0))(fine)
  pick = jnp.take_along_axis(fine, jnp.argmin(errs, axis=0)[None], axis=0)[0]
  return lo * pick, hi * pick


def kl_range(rows, spec: QuantSpec, num_bins: int = 2048):
  lo, hi = minmax_range(rows)
  hist = accumulate_hist(init_hist(rows.shape[0], num_bins), rows, lo, hi)
  return jax.vmap(lambda h, l, u: kl_from_hist(h, l, u, spec))(hist, lo, hi)


# --- streaming: errors per candidate -------------------------------------------------------------------
def init_error_state(num_rows: int, num_candidates: int) -> jax.Array:
  return jnp.zeros((num_rows, num_candidates), jnp.float32)


def accumulate_errors(state, rows, lo, hi, spec: QuantSpec, p: float):
  """Add Σ|x − Q_c(x)|^p for every candidate c (shrink factors of the base range [lo, hi])."""
  r = _ratios(state.shape[1])
  errs = jax.vmap(lambda a: row_error(rows, lo * a, hi * a, spec, p))(r)   # [C, R]
  return state + errs.T


def finalize_errors(state, lo, hi):
  """The best candidate range per row from accumulated errors [R, C] (or [C] for one row)."""
  r = _ratios(state.shape[-1])
  best = r[jnp.argmin(state, axis=-1)]
  return lo * best, hi * best


# --- streaming: histograms ------------------------------------------------------------------------------
def init_hist(num_rows: int, num_bins: int = 2048) -> jax.Array:
  return jnp.zeros((num_rows, num_bins), jnp.float32)


def accumulate_hist(state, rows, lo, hi):
  """Histogram of each row over its base range [lo, hi] (values outside land in the end bins)."""
  bins = state.shape[1]
  width = jnp.maximum(hi - lo, 1e-12)[:, None]
  idx = jnp.clip(jnp.floor((rows - lo[:, None]) / width * bins), 0, bins - 1).astype(jnp.int32)
  one = jax.vmap(lambda i: jnp.zeros((bins,), jnp.float32).at[i].add(1.0))(idx)
  return state + one


def percentile_from_hist(hist, lo, hi, q: float = 99.99):
  """Two-sided percentile range from one row's histogram."""
  bins = hist.shape[0]
  cdf = jnp.cumsum(hist) / jnp.maximum(jnp.sum(hist), 1.0)
  edges = lo + (hi - lo) * jnp.arange(1, bins + 1) / bins
  lower = lo + (hi - lo) * jnp.argmax(cdf >= (100.0 - q) / 100.0) / bins
  upper = edges[jnp.argmax(cdf >= q / 100.0)]
  return jnp.minimum(lower, 0.0), jnp.maximum(upper, 0.0)


def kl_from_hist(hist, lo, hi, spec: QuantSpec, num_candidates: int = 64):
  """Entropy calibration (TensorRT): choose the clipping that minimises KL(P ‖ Q) between the reference
  distribution (clipped, outliers folded into the edge bins) and its quantized version.

  The histogram spans [lo, hi]; candidates shrink both ends toward zero by the same factor (so a
  two-sided, asymmetric range is handled as well as a symmetric one). Levels = the spec's grid size.
  """
  bins = hist.shape[0]
  levels = int(spec.qmax - spec.qmin + 1) if not spec.is_float else 2 ** spec.effective_bits
  centers = lo + (hi - lo) * (jnp.arange(bins) + 0.5) / bins
  ratios = jnp.linspace(1.0, 0.05, num_candidates)

  def kl_for(a):
    c_lo, c_hi = lo * a, hi * a
    inside = (centers >= c_lo) & (centers <= c_hi)
    p = jnp.where(inside, hist, 0.0)
    p = p + jnp.where(centers < c_lo, 0.0, 0.0)
    below = jnp.sum(jnp.where(centers < c_lo, hist, 0.0))
    above = jnp.sum(jnp.where(centers > c_hi, hist, 0.0))
    first = jnp.argmax(inside)
    last = bins - 1 - jnp.argmax(inside[::-1])
    p = p.at[first].add(below).at[last].add(above)
    # quantize the clipped range into `levels` buckets, spreading each bucket's mass over its non-empty bins
    bucket = jnp.clip(jnp.floor((centers - c_lo) / jnp.maximum(c_hi - c_lo, 1e-12) * levels), 0, levels - 1)
    bucket = bucket.astype(jnp.int32)
    mass = jax.ops.segment_sum(p, bucket, levels)
    nonzero = jax.ops.segment_sum(jnp.where((p > 0) & inside, 1.0, 0.0), bucket, levels)
    q = jnp.where((p > 0) & inside, mass[bucket] / jnp.maximum(nonzero[bucket], 1.0), 0.0)
    p_n = p / jnp.maximum(jnp.sum(p), 1e-12)
    q_n = q / jnp.maximum(jnp.sum(q), 1e-12)
    return jnp.sum(jnp.where(p_n > 0, p_n * (jnp.log(p_n + 1e-12) - jnp.log(q_n + 1e-12)), 0.0))

  kls = jax.vmap(kl_for)(ratios)
  best = ratios[jnp.argmin(kls)]
  return lo * best, hi * best
