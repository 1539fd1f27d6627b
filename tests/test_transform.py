"""The Flax transform: discovery, rules, simulate/observe, calibration, timestep tables, recipes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData, select
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules
from dqjax.quant import tables
from dqjax.quant.spec import QuantSpec
from dqjax.transform import apply as qapply
from dqjax.transform.discover import discover
from dqjax.transform.rules import Rule, make_plan
from tests.nets import TinyNet


@pytest.fixture(scope="module")
def net():
  model = TinyNet()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.full((4,), 10.0)
  params = model.init(jax.random.key(1), x, t)["params"]
  return model, params, x, t


def _data(steps=4, n=8, seed=0):
  xs = jax.random.normal(jax.random.key(seed), (steps, n, 8, 8, 1))
  xs = xs * (1.0 + jnp.arange(steps))[:, None, None, None, None]   # ranges grow with the step
  ts = jnp.linspace(900, 100, steps)
  return CalibData(xs, ts, None, jnp.arange(steps))


def test_discover_lists_ops_in_call_order_with_macs(net):
  model, params, x, t = net
  ops = discover(model, {"params": params}, x, t)
  paths = [o.path for o in ops]
  assert paths == ["conv_in", "time_dense", "conv_mid", "to_q", "to_k", "to_v", "qk_matmul", "sv_matmul",
                   "conv_out"]
  conv_mid = ops[2]
  assert conv_mid.kind == "conv" and conv_mid.weight_shape == (3, 3, 8, 8)
  assert conv_mid.macs == 4 * 8 * 8 * 8 * (3 * 3 * 8)
  qk = ops[6]
  assert qk.kind == "matmul" and qk.operands == ("lhs", "rhs")
  assert qk.macs == 4 * 64 * 64 * 8


def test_rules_first_match_wins_and_unused_rule_warns(net):
  model, params, x, t = net
  ops = discover(model, {"params": params}, x, t)
  w4 = QuantSpec("int", 4, granularity="channel")
  w8 = QuantSpec("int", 8, granularity="channel")
  rules = [Rule("conv_.*", weight=w8), Rule(".*", weight=w4), Rule("nothing_matches_this")]
  with pytest.warns(UserWarning, match="matched no op; op paths are: conv_in"):
    plan = make_plan(ops, rules)
  assert plan["conv_mid"].weight == w8 and plan["to_q"].weight == w4
  assert plan["qk_matmul"].weight is None  # no kernel
  table = plan.table()
  assert "| conv_mid | conv | 3×3×8×8 | int8 sym/ch-1 |" in table


def test_bad_rule_regex_is_a_clear_error():
  with pytest.raises(ValueError, match="Rule.pattern"):
    Rule("(unclosed")
  with pytest.raises(ValueError, match="Rule.kinds"):
    Rule(".*", kinds=("linear",))


def _calibrated(net, w_bits, a_bits, method="minmax", table=tables.TableSpec()):
  model, params, x, t = net
  qm = recipe.prepare(model, params, standard_rules(w_bits, a_bits), (x, t))
  qm = calibrate.calibrate_weights(qm, method)
  return calibrate.calibrate_activations(qm, _data(), method, table=table)


def test_simulate_error_shrinks_with_bits(net):
  model, params, x, t = net
  fp = model.apply({"params": params}, x, t)
  errs = {}
  for w, a in ((8, 8), (4, 8), (4, 4)):
    qm = _calibrated(net, w, a)
    out = jax.jit(lambda x, t: qm.apply(x, t))(x, t)
    errs[(w, a)] = float(jnp.linalg.norm(out - fp) / jnp.linalg.norm(fp))
  assert errs[(8, 8)] < 0.1   # static ranges cover steps whose data is 4x wider than x
  assert errs[(8, 8)] < errs[(4, 8)] < errs[(4, 4)]


def test_uncalibrated_op_is_a_clear_error(net):
  model, params, x, t = net
  qm = recipe.prepare(model, params, standard_rules(8, 8), (x, t))
  with pytest.raises(qapply.UncalibratedError, match="weight quantizer has no parameters"):
    qm.apply(x, t)


def test_observe_matches_manual_minmax(net):
  model, params, x, t = net
  qm = recipe.prepare(model, params, standard_rules(8, 8), (x, t))
  data = _data()
  ranges = calibrate.activation_ranges(qm, data)
  lo, hi = ranges["conv_in"]["input"]
  np.testing.assert_allclose(lo[:, 0], data.xs.min(axis=(1, 2, 3, 4)), rtol=1e-6)
  np.testing.assert_allclose(hi[:, 0], data.xs.max(axis=(1, 2, 3, 4)), rtol=1e-6)


def test_per_step_table_varies_with_t_and_does_not_retrace(net):
  model, params, x, t = net
  qm = _calibrated(net, 8, 8, table=tables.TableSpec("per_step"))
  act = qm.qstate["conv_in"].acts["input"]
  assert act.qp.scale.shape[0] == 4 and act.index.shape == (1000,)
  scales = np.asarray(act.qp.scale).ravel()
  assert np.all(np.diff(scales) > 0)       # _data widens by step while t goes from 900 to 100
  traces = []

  @jax.jit
  def f(x, t):
    traces.append(1)
    return qm.apply(x, t)

  outs = [f(x, jnp.full((4,), tv)) for tv in (900.0, 100.0, 633.0)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])
  # per-example lookup: a mixed-t batch equals the rows computed with each t alone
  mixed = f(x, jnp.array([900.0, 900.0, 100.0, 100.0]))
  np.testing.assert_allclose(mixed[:2], outs[0][:2], atol=1e-6)
  np.testing.assert_allclose(mixed[2:], outs[1][2:], atol=1e-6)


def test_grouped_table_boundaries():
  spec = tables.TableSpec("groups", (300, 600))
  idx = tables.timestep_index(spec, [900, 500, 100], 1000)
  assert idx[0] == 0 and idx[299] == 0 and idx[300] == 1 and idx[999] == 2
  with pytest.raises(ValueError, match="TableSpec.kind"):
    tables.TableSpec("per_token")


def test_mse_activation_search_beats_minmax_on_outliers(net):
  model, params, x, t = net
  data = _data()
  data = CalibData(data.xs.at[:, 0, 0, 0, 0].set(60.0), data.ts)  # one outlier per step
  errs = {}
  for method in ("minmax", "mse"):
    qm = recipe.prepare(model, params, standard_rules(8, 4), (x, t))
    qm = calibrate.calibrate_weights(qm, "minmax")
    qm = calibrate.calibrate_activations(qm, data, method)
    fp = model.apply({"params": params}, data.xs[1], jnp.full((8,), data.ts[1]))
    out = qm.apply(data.xs[1], jnp.full((8,), data.ts[1]))
    errs[method] = float(jnp.mean((out - fp) ** 2))
  assert errs["mse"] < errs["minmax"]


def test_histogram_and_exact_mse_activation_searches_agree(net):
  """The default histogram error estimate picks the same ranges as the exact per-candidate sums (or, on a
  near-tie, ranges whose clipping differs by at most one candidate step of 1 %)."""
  model, params, x, t = net
  data = _data()
  data = CalibData(data.xs.at[:, 0, 0, 0, 0].set(60.0), data.ts)
  qm = calibrate.calibrate_weights(recipe.prepare(model, params, standard_rules(8, 4), (x, t)), "minmax")
  got = {e: calibrate.calibrate_activations(qm, data, "mse", error_estimate=e) for e in ("hist", "exact")}
  for a, b in zip(jax.tree_util.tree_leaves(got["hist"].qstate), jax.tree_util.tree_leaves(got["exact"].qstate)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.011, atol=1e-6)
  with pytest.raises(ValueError, match="error_estimate='fast' is unknown; accepted values: hist, exact"):
    calibrate.calibrate_activations(qm, data, "mse", error_estimate="fast")


def test_nan_calibration_data_is_refused(net):
  data = _data()
  bad = CalibData(data.xs.at[0, 0, 0, 0, 0].set(jnp.nan), data.ts)
  model, params, x, t = net
  qm = recipe.prepare(model, params, standard_rules(8, 8), (x, t))
  with pytest.raises(ValueError, match="'xs' contains 1 NaN/inf"):
    calibrate.calibrate_activations(qm, bad)


def test_lsq_gradients_flow_to_scales(net):
  model, params, x, t = net
  qm = _calibrated(net, 4, 4)
  fp = model.apply({"params": params}, x, t)

  def loss(qstate):
    out = qapply.quantized_apply(model, qm.plan, params, qstate, x, t, t=t)
    return jnp.mean((out - fp) ** 2)

  g = jax.jit(jax.grad(loss))(qm.qstate)
  gs = g["conv_mid"].acts["input"].qp.scale
  gw = g["conv_mid"].weight.scale
  assert np.all(np.isfinite(gs)) and np.any(gs != 0)
  assert np.all(np.isfinite(gw)) and np.any(gw != 0)


def test_calibration_is_deterministic(net):
  a = _calibrated(net, 4, 8, method="mse")
  b = _calibrated(net, 4, 8, method="mse")
  for la, lb in zip(jax.tree_util.tree_leaves(a.qstate), jax.tree_util.tree_leaves(b.qstate)):
    np.testing.assert_array_equal(la, lb)


def test_selection_policies():
  data = _data(steps=20)
  assert select(data, "uniform", 5).num_steps == 5
  nd = select(data, "normal", 6, seed=3)
  assert nd.num_steps == 6
  # NDTC skews toward the end of denoising: most picked steps are in the later half
  assert np.mean(np.asarray(nd.step_index)) > 9.5   # 9.5 is the mean of a uniform pick
  with pytest.raises(ValueError, match="selection policy"):
    select(data, "bogus", 3)


def test_recipe_registry_lists_baselines_and_rejects_unknown():
  names = recipe.available("unet")
  assert "minmax" in names and "mse" in names
  with pytest.raises(ValueError, match="unknown method 'nope'; accepted values:"):
    recipe.build("nope")
