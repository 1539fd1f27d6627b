"""Pure quantization ops: error bounds, idempotence, exact grids, saturation, minifloat rounding against
ml_dtypes, and jit / vmap / grad behaviour (STE, LSQ scale gradient, unbiased stochastic rounding)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqjax.quant import ops as qops
from dqjax.quant.spec import FLOAT_FORMATS, QuantSpec

SETTINGS = settings(max_examples=25, deadline=None)
ML = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
      "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
      "fp4_e2m1": ml_dtypes.float4_e2m1fn}
SHAPES = [(16,), (4, 6), (2, 3, 8)]
# jitted once per (spec, shape): far fewer compilations than op-by-op eager dispatch
FQ = jax.jit(qops.fake_quant, static_argnames=("spec", "rounding"))


def _minmax(x, spec):
  xg = qops.group_view(x, spec)
  return qops.minmax_params(xg, spec, qops.weight_reduce_axes(spec, xg.ndim))


MINMAX = jax.jit(_minmax, static_argnames=("spec",))
# (format, bits, symmetric, signed, narrow_range)
INT_KINDS = [("int", 8, True, True, False), ("int", 4, True, True, True), ("int", 3, True, True, False),
             ("int", 8, False, True, False), ("int", 4, False, True, False), ("int", 2, False, True, False),
             ("int", 8, True, False, False), ("int", 4, True, False, False), ("ternary", 2, True, True, False)]


@st.composite
def int_cases(draw, kinds=INT_KINDS):
  """(x, spec, qparams): an int-like spec at tensor/channel/group granularity with min/max parameters."""
  fmt, bits, sym, signed, narrow = draw(st.sampled_from(kinds))
  shape = draw(st.sampled_from(SHAPES))
  gran = draw(st.sampled_from(["tensor", "channel", "group"]))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  n = shape[axis]
  kw = {}
  if gran == "group":
    kw["group_size"] = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
  spec = QuantSpec(fmt, bits, symmetric=sym, signed=signed, narrow_range=narrow, granularity=gran,
                   axis=axis, **kw)
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
  x = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** draw(st.integers(-3, 3)))
  x += np.float32(draw(st.sampled_from([0.0, 0.5, -2.0]))) * np.abs(x).max()
  if spec.symmetric and not spec.signed and spec.format == "int":
    x = np.abs(x)     # unsigned grids represent [0, hi]
  return jnp.asarray(x), spec, MINMAX(jnp.asarray(x), spec=spec)


def _step(qp, spec, shape):
  """The grid step broadcast to the tensor's shape."""
  ones = qops.group_view(jnp.ones(shape), spec)
  return np.asarray(qops.ungroup_view(ones * qp.scale, spec, shape))


@SETTINGS
@given(int_cases())
def test_error_at_most_half_a_step_inside_the_range(case):
  x, spec, qp = case
  err = np.abs(np.asarray(FQ(x, qp, spec=spec)) - np.asarray(x))
  step = _step(qp, spec, x.shape)
  # half a step, plus float32 rounding of x/s and of the product (relative 1e-6 of |x|)
  assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(np.asarray(x))), (spec, err.max(), step.max())


@SETTINGS
@given(int_cases(INT_KINDS + [("binary", 1, True, True, False)]), st.sampled_from([None] + list(FLOAT_FORMATS)))
def test_fake_quant_is_idempotent(case, fmt):
  x, spec, qp = case
  if fmt is not None:       # the same granularity with a float format (scale from the absmax)
    spec = spec.replace(format=fmt, symmetric=True, signed=True)
    qp = MINMAX(x, spec=spec)
  once = FQ(x, qp, spec=spec)
  np.testing.assert_array_equal(np.asarray(FQ(once, qp, spec=spec)), np.asarray(once))


@SETTINGS
@given(st.sampled_from(INT_KINDS), st.floats(1e-3, 1e3), st.integers(0, 2 ** 32 - 1))
def test_grid_points_are_exact(kind, scale, seed):
  fmt, bits, sym, signed, narrow = kind
  spec = QuantSpec(fmt, bits, symmetric=sym, signed=signed, narrow_range=narrow)
  rng = np.random.default_rng(seed)
  codes = rng.integers(spec.qmin, spec.qmax + 1, size=(64,))
  s = np.float32(scale)
  if sym or fmt == "ternary":
    qp, z = qops.QParams(scale=jnp.float32(s)), 0
  else:
    z = int(rng.integers(spec.qmin, spec.qmax + 1))
    qp = qops.QParams(scale=jnp.float32(s), zero_point=jnp.float32(z))
  x = ((codes - z).astype(np.float32) * s).astype(np.float32)
  q = np.asarray(qops.quantize(jnp.asarray(x), qp, spec))
  np.testing.assert_array_equal(q, codes)
  np.testing.assert_array_equal(np.asarray(qops.dequantize(jnp.asarray(q), qp, spec)), x)
  np.testing.assert_array_equal(np.asarray(qops.fake_quant(jnp.asarray(x), qp, spec)), x)


@pytest.mark.parametrize("fmt", list(FLOAT_FORMATS))
def test_float_grid_points_are_exact(fmt):
  grid = _float_grid(fmt)
  s = np.float32(0.37)
  x = (grid * s).astype(np.float32)
  spec, qp = QuantSpec(fmt), qops.QParams(scale=jnp.float32(s))
  g = np.asarray(qops.quantize(jnp.asarray(x), qp, spec))
  np.testing.assert_array_equal(g, grid)
  np.testing.assert_array_equal(np.asarray(qops.dequantize(jnp.asarray(g), qp, spec)), x)


@SETTINGS
@given(int_cases(), st.floats(0.01, 1e3))
def test_values_beyond_the_range_saturate_at_the_end_levels(case, beyond):
  x, spec, qp = case
  step = _step(qp, spec, x.shape)
  z = 0.0 if qp.zero_point is None else np.asarray(qops.ungroup_view(
      qops.group_view(jnp.zeros(x.shape), spec) + jnp.round(qp.zero_point), spec, x.shape))
  top, bottom = (spec.qmax - z) * step, (spec.qmin - z) * step
  far = np.float32(1 + beyond)
  hi_x = jnp.asarray(np.abs(np.asarray(x)) * far + step * (spec.qmax + abs(spec.qmin) + 2))
  np.testing.assert_allclose(np.asarray(FQ(hi_x, qp, spec=spec)), top, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(FQ(-hi_x, qp, spec=spec)), bottom, rtol=1e-6)


# --- minifloat rounding --------------------------------------------------------------------------------
def _float_grid(fmt):
  nb = 2 ** QuantSpec(fmt).effective_bits
  vals = np.arange(nb, dtype=np.uint8).view(ML[fmt]).astype(np.float32)
  return np.unique(vals[np.isfinite(vals)])


def _edge_values(fmt):
  """Every grid value, every midpoint (ties: round half to even) and its float32 neighbours, the
  smallest subnormal and its half, and zero of both signs."""
  grid = _float_grid(fmt)
  mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
  sub = grid[grid > 0].min()
  return np.concatenate([grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                         [sub / 2, -sub / 2, sub * 0.49, sub * 0.51, 0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)


@pytest.mark.parametrize("fmt", list(FLOAT_FORMATS))
def test_minifloat_round_matches_ml_dtypes_on_edge_values(fmt):
  x = _edge_values(fmt)
  x = x[np.abs(x) <= FLOAT_FORMATS[fmt][2]]
  got = np.asarray(jax.jit(qops.minifloat_round, static_argnums=1)(jnp.asarray(x), fmt))
  np.testing.assert_array_equal(got, x.astype(ML[fmt]).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(list(FLOAT_FORMATS)), st.integers(0, 2 ** 32 - 1), st.integers(-20, 3))
def test_minifloat_round_matches_ml_dtypes_on_random_values(fmt, seed, log_scale):
  mx = FLOAT_FORMATS[fmt][2]
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(512) * 2.0 ** log_scale * mx).astype(np.float32)
  x = np.clip(x, -mx, mx)     # ml_dtypes gives nan/inf beyond max for fp8: saturation is tested apart
  got = np.asarray(qops.minifloat_round(jnp.asarray(x), fmt))
  np.testing.assert_array_equal(got, x.astype(ML[fmt]).astype(np.float32))


@pytest.mark.parametrize("fmt", list(FLOAT_FORMATS))
def test_minifloat_round_saturates_beyond_max(fmt):
  mx = FLOAT_FORMATS[fmt][2]
  x = np.array([mx * 1.01, mx * 1.5, mx * 1e3, 3e38, np.inf], np.float32)
  got = np.asarray(qops.minifloat_round(jnp.asarray(np.concatenate([x, -x])), fmt))
  np.testing.assert_array_equal(got, np.concatenate([np.full(5, mx), np.full(5, -mx)]).astype(np.float32))
  if fmt.startswith("fp6") or fmt.startswith("fp4"):      # these ml_dtypes types saturate too
    np.testing.assert_array_equal(got[:4], x[:4].astype(ML[fmt]).astype(np.float32))


# --- transformations -------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)   # the eager reference dispatches op by op: slow per example
@given(int_cases())
def test_jit_and_vmap_agree_with_eager(case):
  x, spec, qp = case
  with jax.disable_jit():
    eager = np.asarray(qops.fake_quant(x, qp, spec))
  np.testing.assert_array_equal(np.asarray(FQ(x, qp, spec=spec)), eager)
  batch = jnp.stack([x, 2 * x, -x])
  out = jax.jit(jax.vmap(lambda a: qops.fake_quant(a, qp, spec)))(batch)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(FQ(batch[i], qp, spec=spec)))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False),
                                  QuantSpec(bits=8, signed=False), QuantSpec("ternary"),
                                  QuantSpec("fp4_e2m1"), QuantSpec("fp8_e4m3")])
def test_input_gradient_is_one_inside_and_zero_outside(spec):
  x = jnp.linspace(-1.0, 2.0, 301)
  lo, hi = (0.0, 1.0) if not spec.signed else (-0.5, 1.0)
  qp = qops.params_from_range(jnp.float32(lo), jnp.float32(hi), spec)
  g = np.asarray(jax.grad(lambda a: jnp.sum(qops.fake_quant(a, qp, spec)))(x))
  # the representable range of the grid (its end levels), not the calibration range
  s = float(qp.scale)
  z = 0.0 if qp.zero_point is None else float(jnp.round(qp.zero_point))
  top = FLOAT_FORMATS[spec.format][2] * s if spec.is_float else (spec.qmax - z) * s
  bottom = -top if spec.is_float else (spec.qmin - z) * s
  xs = np.asarray(x)
  inside = (xs > bottom + 1e-4) & (xs < top - 1e-4)
  outside = (xs < bottom - 1e-4) | (xs > top + 1e-4)
  assert inside.sum() > 50 and outside.sum() > 50
  np.testing.assert_array_equal(g[inside], 1.0)
  np.testing.assert_array_equal(g[outside], 0.0)


def test_scale_gradient_is_the_lsq_formula_on_a_hand_case():
  # int4 symmetric, s = 0.5: inside, d x_hat / ds = round(x/s) − x/s; clipped: qmax = 7 or qmin = −8.
  spec = QuantSpec(bits=4)
  x = jnp.array([0.3, 1.2, -0.9, 10.0, -10.0])
  expected = np.array([1 - 0.6, 2 - 2.4, -2 + 1.8, 7.0, -8.0], np.float32)
  g = jax.vmap(jax.grad(lambda s, a: qops.fake_quant(a, qops.QParams(scale=s), spec)), in_axes=(None, 0))(
      jnp.float32(0.5), x)
  np.testing.assert_allclose(np.asarray(g), expected, atol=1e-6)
  # with LSQ's gradient scale g = 1/sqrt(N·Qp) the value is unchanged and the gradient multiplied by g
  f = 1.0 / np.sqrt(x.size * spec.qmax)
  g2 = jax.grad(lambda s: jnp.sum(qops.fake_quant(x, qops.QParams(scale=qops.grad_scale(s, f)), spec)))(0.5)
  np.testing.assert_allclose(float(g2), expected.sum() * f, rtol=1e-5)


GRAD_Q = jax.jit(jax.grad(lambda x, q, spec: jnp.sum(qops.fake_quant(x, q, spec) ** 2), argnums=1),
                 static_argnames=("spec",))


@SETTINGS
@given(int_cases(INT_KINDS + [("binary", 1, True, True, False)]), st.sampled_from([None] + list(FLOAT_FORMATS)))
def test_scale_and_zero_point_gradients_are_finite(case, fmt):
  x, spec, qp = case
  if fmt is not None:
    spec = spec.replace(format=fmt, symmetric=True, signed=True)
    qp = MINMAX(x, spec=spec)
  g = GRAD_Q(x, qp, spec=spec)
  for leaf in jax.tree_util.tree_leaves(g):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_stochastic_rounding_is_unbiased():
  spec = QuantSpec(bits=4)
  s = 0.25
  x = jnp.array([0.01, 0.1, 0.2, 0.3, -0.37, 1.13, -1.99, 0.125])
  n = 4000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  out = jax.vmap(lambda k: qops.fake_quant(x, qops.QParams(scale=jnp.float32(s)), spec, rounding="stochastic",
                                           key=k))(keys)
  out = np.asarray(out)
  frac = np.asarray(x) / s - np.floor(np.asarray(x) / s)
  assert set(np.unique(np.round(out / s, 4))) <= set(np.arange(-8, 8, dtype=np.float64))  # on the grid
  sigma = s * np.sqrt(frac * (1 - frac) / n) + 1e-7
  assert np.all(np.abs(out.mean(0) - np.asarray(x)) <= 5 * sigma), (out.mean(0), x)
  # and deterministic given the key
  again = qops.fake_quant(x, qops.QParams(scale=jnp.float32(s)), spec, rounding="stochastic", key=keys[3])
  np.testing.assert_array_equal(np.asarray(again), out[3])


def test_rounding_errors_name_the_argument():
  spec = QuantSpec(bits=4)
  qp = qops.QParams(scale=jnp.float32(0.1))
  with pytest.raises(ValueError, match="rounding='up' is unknown; accepted values: nearest, stochastic, floor"):
    qops.fake_quant(jnp.ones(3), qp, spec, rounding="up")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    qops.fake_quant(jnp.ones(3), qp, spec, rounding="stochastic")
  with pytest.raises(ValueError, match="no parameters for the static spec"):
    qops.fake_quant(jnp.ones(3), None, spec)


def test_dynamic_token_quantization_uses_per_row_absmax():
  spec = QuantSpec(bits=8, granularity="token", axis=-1)
  x = jnp.array([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
  out = np.asarray(qops.fake_quant(x, None, spec))
  for i in range(2):
    s = np.abs(np.asarray(x[i])).max() / 127
    np.testing.assert_allclose(out[i], np.round(np.asarray(x[i]) / s) * s, rtol=1e-6)
