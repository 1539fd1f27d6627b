"""Pure quantization ops: quantize, dequantize, fake_quant, with straight-through gradients.

Every function here is a pure function of arrays and a static `QuantSpec`, so it works under `jit`,
`vmap` and `grad`. Gradients follow the conventions of the field:
- the input gets a straight-through estimator (identity inside the representable range, zero outside);
- the scale gets the LSQ gradient (Esser et al. 2020), which falls out of writing the quantizer with a
  straight-through `round`; `grad_scale` adds LSQ's 1/sqrt(N*Qp) factor when wanted;
- a learnable zero point / offset gets the LSQ+ gradient the same way.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from dqjax.quant.spec import BINARY, FLOAT_FORMATS, TERNARY, QuantSpec

Array = jax.Array


@struct.dataclass
class QParams:
  """Calibrated parameters of one quantizer. Shapes broadcast against the (group-reshaped) tensor.

  `zero_point` is None for symmetric grids. It is kept in float so that LSQ+ can learn it; it is rounded
  (straight-through) whenever it is used.
  """
  scale: Array
  zero_point: Optional[Array] = None


# --- straight-through primitives ------------------------------------------------------------------
def round_ste(x: Array) -> Array:
  """round(x) forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def floor_ste(x: Array) -> Array:
  return x + jax.lax.stop_gradient(jnp.floor(x) - x)


def grad_scale(x: Array, factor) -> Array:
  """Value of x, gradient multiplied by `factor` (LSQ's 1/sqrt(N*Qp) step-size gradient scale)."""
  return x * factor + jax.lax.stop_gradient(x - x * factor)


def sign_ste(x: Array) -> Array:
  """sign with sign(0)=+1 forward; clipped identity backward (zero where |x| > 1)."""
  s = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
  clipped = jnp.clip(x, -1.0, 1.0)
  return clipped + jax.lax.stop_gradient(s - clipped)


def clip_ste(u: Array, lo, hi) -> Array:
  """clip(u, lo, hi) with gradient 1 on the closed interval [lo, hi] and 0 outside.

  `jnp.clip` splits the gradient 0.5/0.5 when u equals a bound, and after rounding u equals a bound on a
  whole step (and at the calibrated absmax), which halved the STE/LSQ gradient there. LSQ's and torch's
  clamp conventions are inclusive.
  """
  return jnp.where((u >= lo) & (u <= hi), u, jnp.clip(u, lo, hi))


def minifloat_round(x: Array, fmt: str) -> Array:
  """Round to the nearest value of a small float format (round half to even, saturating at its max).

  Written in plain jnp so that every format (fp6 included, which XLA cannot cast to) behaves the same and
  compiles everywhere; `tests/test_quant_ops.py` checks it against `ml_dtypes` casts. The exponent comes
  from `frexp` and the step 2^(e-m) is built from its bit pattern, both exact (`log2`/`exp2` are not on
  XLA:CPU, which made fp8_e5m2 steps off by an ulp).
  """
  e_bits, m_bits, max_val = FLOAT_FORMATS[fmt]
  bias = 2 ** (e_bits - 1) - 1
  min_exp = 1 - bias  # exponent of the smallest normal; below it the step is constant (subnormals)
  ax = jnp.abs(x).astype(jnp.float32)
  _, e = jnp.frexp(ax)                       # ax = f * 2^e with f in [0.5, 1): floor(log2 ax) = e - 1
  exp = jnp.maximum(e - 1, min_exp)
  step = jax.lax.bitcast_convert_type((exp - m_bits + 127) << 23, jnp.float32)   # exactly 2^(exp - m)
  q = jnp.round(ax / step) * step
  q = jnp.minimum(q, max_val)
  return (jnp.sign(x) * q).astype(x.dtype)


def minifloat_round_ste(x: Array, fmt: str) -> Array:
  """minifloat_round forward; straight-through inside [-max, max] and zero gradient beyond (saturation),
  like the int quantizer's clip."""
  max_val = FLOAT_FORMATS[fmt][2]
  xc = clip_ste(x, -max_val, max_val)
  return xc + jax.lax.stop_gradient(minifloat_round(xc, fmt) - xc)


# --- granularity helpers --------------------------------------------------------------------------
def _norm_axis(axis: int, ndim: int) -> int:
  a = axis if axis >= 0 else axis + ndim
  if not 0 <= a < ndim:
    raise ValueError(f"QuantSpec.axis={axis} does not fit a tensor of rank {ndim}")
  return a


def group_view(x: Array, spec: QuantSpec) -> Array:
  """For 'group' granularity, split `axis` into (groups, group_size); other granularities: unchanged."""
  if spec.granularity != "group":
    return x
  a = _norm_axis(spec.axis, x.ndim)
  n = x.shape[a]
  if n % spec.group_size:
    raise ValueError(f"QuantSpec.group_size={spec.group_size} does not divide axis {spec.axis} of size {n} "
                     f"(tensor shape {tuple(x.shape)}); accepted: a divisor of {n}")
  return x.reshape(x.shape[:a] + (n // spec.group_size, spec.group_size) + x.shape[a + 1:])


def ungroup_view(xg: Array, spec: QuantSpec, shape) -> Array:
  return xg.reshape(shape) if spec.granularity == "group" else xg


def reduce_axes(spec: QuantSpec, ndim: int, *, per_example: bool = False) -> tuple[int, ...]:
  """Axes (of the group view) that one quantization parameter spans.

  `per_example=False` (weights, static activations): a parameter is shared by everything except the
  channel / group index. For dynamic quantizers the reduction is the run-time one: 'token' reduces only the
  feature axis, dynamic 'group' reduces within each group of each row.
  """
  if spec.granularity == "tensor":
    return tuple(range(ndim))
  if spec.granularity == "token":
    return (_norm_axis(spec.axis, ndim),)
  if spec.granularity == "channel":
    a = _norm_axis(spec.axis, ndim)
    return tuple(i for i in range(ndim) if i != a)
  # group: the group view has one more axis than the tensor; the in-group axis follows the group axis.
  a = _norm_axis(spec.axis, ndim - 1)
  if spec.dynamic or per_example:
    return (a + 1,)
  return tuple(i for i in range(ndim) if i != a)


def weight_reduce_axes(spec: QuantSpec, ndim: int) -> tuple[int, ...]:
  """Weights: group parameters are per (group, other indices), i.e. reduce only inside the group."""
  if spec.granularity == "group":
    return (_norm_axis(spec.axis, ndim - 1) + 1,)
  return reduce_axes(spec, ndim)


# --- from a range to parameters ---------------------------------------------------------------------
def params_from_range(lo: Array, hi: Array, spec: QuantSpec) -> QParams:
  """Scale (and zero point) that map [lo, hi] onto the spec's grid. The range is widened to include 0."""
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  eps = 1e-8
  if spec.format == BINARY:
    raise ValueError("binary quantizers take their scale from mean|x| (see binary_params), not a range")
  if spec.is_float or spec.format == TERNARY or spec.symmetric:
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    if not spec.is_float and spec.format != TERNARY and not spec.signed:
      absmax = hi
    level = spec.max_abs_level if spec.is_float else float(spec.qmax)
    return QParams(scale=jnp.maximum(absmax / level, eps))
  scale = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), eps)
  zp = jnp.clip(spec.qmin - jnp.round(lo / scale), spec.qmin, spec.qmax)
  return QParams(scale=scale, zero_point=zp)


def binary_params(x: Array, spec: QuantSpec, axes) -> QParams:
  """The L2-optimal binary scale: mean |x| over the parameter's span (XNOR-Net)."""
  return QParams(scale=jnp.maximum(jnp.mean(jnp.abs(x), axis=axes, keepdims=True), 1e-8))


def minmax_params(x: Array, spec: QuantSpec, axes) -> QParams:
  if spec.format == BINARY:
    return binary_params(x, spec, axes)
  return params_from_range(jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True), spec)


def dynamic_params(xg: Array, spec: QuantSpec) -> QParams:
  """Run-time parameters of a dynamic quantizer (no gradient flows into them)."""
  axes = reduce_axes(spec, xg.ndim, per_example=True)
  return jax.tree_util.tree_map(jax.lax.stop_gradient, minmax_params(xg, spec, axes))


# --- the quantizer ------------------------------------------------------------------------------------
def _grid_round(u: Array, rounding: str, key) -> Array:
  if rounding == "nearest":
    return round_ste(u)
  if rounding == "stochastic":
    if key is None:
      raise ValueError("rounding='stochastic' needs a PRNG key")
    noise = jax.random.uniform(key, u.shape, u.dtype)
    return u + jax.lax.stop_gradient(jnp.floor(u + noise) - u)
  if rounding == "floor":
    return floor_ste(u)
  raise ValueError(f"rounding={rounding!r} is unknown; accepted values: nearest, stochastic, floor")


def fake_quant(x: Array, qp: Optional[QParams], spec: QuantSpec, *, rounding: str = "nearest", key=None,
               rounding_offset: Optional[Array] = None) -> Array:
  """Quantize then dequantize (simulation). Differentiable w.r.t. x (STE), scale (LSQ) and zero point.

  Args:
    x: the tensor.
    qp: its parameters (ignored and recomputed for dynamic specs; may be None then).
    spec: the static spec.
    rounding: 'nearest' | 'stochastic' (needs `key`) | 'floor'.
    rounding_offset: AdaRound's h(V) in [0, 1], added to floor(x/s) instead of rounding (weights only).
  """
  shape = x.shape
  xg = group_view(x, spec)
  if spec.dynamic or qp is None:
    if not spec.dynamic:
      raise ValueError(f"fake_quant got no parameters for the static spec {spec.short()}")
    qp = dynamic_params(xg, spec)
  s = qp.scale
  if spec.format == BINARY:
    out = s * sign_ste(xg / s)
  elif spec.is_float:
    out = minifloat_round_ste(xg / s, spec.format) * s
  else:
    # Clip, then round: equal values to clip(round(u)) for integer bounds, but the gradient is the LSQ one
    # (1 for qmin <= u <= qmax, 0 outside) instead of being halved on the end levels. AdaRound's soft
    # offset is not integer-valued, so there the clip follows the offset, as in the paper.
    # The zero point moves the bounds (qmin − z, qmax − z stay integers), so round(u) is taken before any
    # float addition of z, exactly as in `quantize`.
    u = xg / s
    lo, hi = spec.qmin, spec.qmax
    if not (spec.symmetric or spec.format == TERNARY or qp.zero_point is None):
      z = round_ste(qp.zero_point)
      lo, hi = lo - z, hi - z
    if rounding_offset is not None:
      r = clip_ste(floor_ste(u) + group_view(rounding_offset, spec), lo, hi)
    else:
      r = _grid_round(clip_ste(u, lo, hi), rounding, key)
    out = r * s
  return ungroup_view(out.astype(x.dtype), spec, shape)


def quantize(x: Array, qp: QParams, spec: QuantSpec) -> Array:
  """Integer codes (int32) for int/binary/ternary specs, grid values (float32, unscaled) for float formats.

  Dequantize with `dequantize`. Group-granular tensors keep their original shape.
  """
  shape = x.shape
  xg = group_view(x, spec)
  s = qp.scale
  if spec.format == BINARY:
    codes = jnp.where(xg >= 0, 1, -1).astype(jnp.int32)
  elif spec.is_float:
    codes = minifloat_round(xg / s, spec.format).astype(jnp.float32)
  else:
    z = 0 if (spec.symmetric or qp.zero_point is None) else jnp.round(qp.zero_point)
    codes = jnp.clip(jnp.round(xg / s) + z, spec.qmin, spec.qmax).astype(jnp.int32)
  return ungroup_view(codes, spec, shape)


def dequantize(codes: Array, qp: QParams, spec: QuantSpec, dtype=jnp.float32) -> Array:
  shape = codes.shape
  cg = group_view(codes.astype(jnp.float32), spec)
  if spec.format == BINARY or spec.is_float or spec.symmetric or qp.zero_point is None:
    out = cg * qp.scale
  else:
    out = (cg - jnp.round(qp.zero_point)) * qp.scale
  return ungroup_view(out.astype(dtype), spec, shape)


def quant_step(qp: QParams) -> Array:
  """The grid step of an int quantizer (its scale): used by error bounds in tests and analyses."""
  return qp.scale


def lsq_init_scale(x: Array, spec: QuantSpec, axes) -> QParams:
  """LSQ's scale initialisation 2*mean|x|/sqrt(Qp)."""
  qp_level = max(spec.qmax, 1)
  return QParams(scale=jnp.maximum(2 * jnp.mean(jnp.abs(x), axis=axes, keepdims=True) / qp_level ** 0.5,
                                   1e-8))
