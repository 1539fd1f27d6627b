"""AdaRound: the initial soft weight equals the float weight, hard rounding of the init is round-to-nearest,
the regulariser and the β / λ schedules, and jit / grad safety."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqjax.quant import ops as qops
from dqjax.quant import rounding as rnd
from dqjax.quant.spec import QuantSpec

SPECS = [QuantSpec(bits=4, granularity="channel", axis=-1),
         QuantSpec(bits=4, symmetric=False, granularity="channel", axis=-1),
         QuantSpec(bits=3, granularity="tensor"),
         QuantSpec(bits=4, granularity="group", axis=0, group_size=4),
         QuantSpec(bits=2, symmetric=False, granularity="group", axis=0, group_size=8)]


def _params(w, spec):
  wg = qops.group_view(w, spec)
  return qops.minmax_params(wg, spec, qops.weight_reduce_axes(spec, wg.ndim))


# LLVM's optimisations buy nothing on [16, 6] arrays and take half of the compile (IEEE results are the same)
@functools.partial(jax.jit, static_argnames=("spec",), compiler_options={"xla_backend_optimization_level": 0})
def _init_case(w, spec):
  """Everything the init test compares, from one compiled call per spec (eagerly, its ~80 small ops were each
  compiled on their own, most of the test's CPU): V, h(V), w/s, the grid step, the grid's top and bottom,
  and the fake-quantized weight with soft, hard and no AdaRound rounding."""
  qp = _params(w, spec)
  v = rnd.adaround_init(w, qp, spec)
  fq = lambda x, off=None: qops.fake_quant(x, qp, spec, rounding_offset=off)
  return dict(v=v, h=rnd.rectified_sigmoid(v),
              u=qops.ungroup_view(qops.group_view(w, spec) / qp.scale, spec, w.shape),
              step=qops.ungroup_view(qops.group_view(jnp.ones_like(w), spec) * qp.scale, spec, w.shape),
              top=fq(jnp.full_like(w, 1e9)), bottom=fq(jnp.full_like(w, -1e9)),
              soft=fq(w, rnd.adaround_offset(v, hard=False)), hard=fq(w, rnd.adaround_offset(v, hard=True)),
              nearest=fq(w))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(SPECS), st.integers(0, 2 ** 32 - 1))
def test_init_reproduces_the_float_weight_and_round_to_nearest(spec, seed):
  w = np.random.default_rng(seed).standard_normal((16, 6)).astype(np.float32)
  r = {k: np.asarray(a) for k, a in _init_case(jnp.asarray(w), spec).items()}
  v = r["v"]
  assert v.shape == w.shape and np.all(np.isfinite(v))
  # h(V) = frac(w/s)
  frac = r["u"] - np.floor(r["u"])
  np.testing.assert_allclose(r["h"], frac, atol=2e-6)
  # soft-quantized weight = float weight inside the grid's range [bottom, top] (min/max parameters leave
  # weights outside it only through the zero point's rounding: half a step at most)
  step = r["step"]
  err = np.abs(r["soft"] - w)
  inside = (w >= r["bottom"]) & (w <= r["top"])
  assert inside.mean() > 0.5
  assert np.all(err[inside] <= 1e-5 * step[inside] + 1e-6)
  assert np.all(err <= 0.5 * step + 1e-6)
  # hard rounding of the initial V is round-to-nearest (away from exact ties)
  away = np.abs(frac - 0.5) > 1e-4
  np.testing.assert_array_equal(r["hard"][away], r["nearest"][away])


def test_init_reaches_both_ends_of_the_rectified_sigmoid():
  spec = QuantSpec(bits=8)
  qp = qops.QParams(scale=jnp.float32(0.5))
  w = jnp.array([0.0, 1.0, -1.5, 0.25, 0.4999999])   # frac 0, 0, 0, 0.5, ~1
  h = np.asarray(rnd.adaround_offset(rnd.adaround_init(w, qp, spec), hard=False))
  np.testing.assert_allclose(h, [0.0, 0.0, 0.0, 0.5, 1.0], atol=1e-6)


def test_rectified_sigmoid_and_inverse():
  v = jnp.linspace(-10, 10, 201)
  h = np.asarray(rnd.rectified_sigmoid(v))
  assert h.min() == 0.0 and h.max() == 1.0 and np.all(np.diff(h) >= 0)
  hs = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(np.asarray(rnd.rectified_sigmoid(rnd.inverse_rectified_sigmoid(hs))), hs, atol=1e-6)
  assert float(rnd.rectified_sigmoid(0.0)) == pytest.approx(0.5)


def test_regularizer_values_and_gradient():
  # h ∈ {0, 1}: zero; h = 1/2 (V = 0): one per element; in between: 1 − |2h − 1|^β
  assert float(rnd.adaround_regularizer(jnp.array([-10.0, 10.0, -5.0]), 20.0)) == 0.0
  assert float(rnd.adaround_regularizer(jnp.zeros(7), 2.0)) == pytest.approx(7.0)
  v = jnp.array([0.7, -0.3])
  h = np.asarray(rnd.rectified_sigmoid(v))
  np.testing.assert_allclose(float(rnd.adaround_regularizer(v, 2.0)), np.sum(1 - np.abs(2 * h - 1) ** 2),
                             rtol=1e-6)
  # a high β (early) is flat: ≈ 1 per element unless h is already near 0 or 1
  assert float(rnd.adaround_regularizer(v, 20.0)) > float(rnd.adaround_regularizer(v, 2.0))
  # gradient through a traced β (inside jit) is finite, also at V = 0 (|2h − 1| = 0)
  g = jax.jit(jax.grad(rnd.adaround_regularizer))(jnp.array([0.0, 0.3, -2.0, 9.0]), jnp.float32(11.0))
  assert np.all(np.isfinite(np.asarray(g)))
  assert float(g[1]) < 0 and float(g[2]) > 0      # pushes h away from 1/2


def test_beta_schedule_and_round_loss_weight():
  total = 1000
  assert float(rnd.beta_schedule(0, total)) == 20.0
  assert float(rnd.beta_schedule(199, total)) == 20.0           # warm-up: first 20 %
  assert float(rnd.beta_schedule(total, total)) == pytest.approx(2.0)
  assert float(rnd.beta_schedule(600, total)) == pytest.approx(11.0)   # halfway through the annealing
  betas = np.asarray(jax.jit(jax.vmap(lambda s: rnd.beta_schedule(s, total)))(jnp.arange(total + 1)))
  assert np.all(np.diff(betas) <= 0)
  assert float(rnd.round_loss_weight(199, total, 0.2, 0.01)) == 0.0
  assert float(rnd.round_loss_weight(200, total, 0.2, 0.01)) == pytest.approx(0.01)
  assert float(rnd.beta_schedule(50, 100, warmup=0.5, start=10.0, end=4.0)) == 10.0


def test_gradient_flows_to_v_through_fake_quant():
  spec = QuantSpec(bits=4, granularity="channel", axis=-1)
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
  qp = _params(w, spec)
  v = rnd.adaround_init(w, qp, spec)
  target = w * 1.01

  @jax.jit
  def loss(v):
    wq = qops.fake_quant(w, qp, spec, rounding_offset=rnd.adaround_offset(v, hard=False))
    return jnp.sum((wq - target) ** 2)

  g = np.asarray(jax.grad(loss)(v))
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  # a few plain gradient steps reduce the loss
  v2 = v
  for _ in range(5):
    v2 = v2 - 10.0 * jax.grad(loss)(v2)
  assert float(loss(v2)) < float(loss(v))
