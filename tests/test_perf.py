"""The perf code paths (no timed assertions): eager reference searches = compiled calibration, the ratio
regression check, the report writer."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from dqjax.benchmark import perf
from dqjax.calib.data import CalibData
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules
from tests.nets import TinyNet


@pytest.fixture(scope="module")
def tiny():
  model = TinyNet(features=8)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  t = jnp.full((2,), 10.0)
  params = model.init(jax.random.key(1), x, t)["params"]
  qm = recipe.prepare(model, params, standard_rules(8, 8), (x, t, None), warn_unused=False)
  xs = jax.random.normal(jax.random.key(2), (3, 4, 4, 4, 1)) * (1.0 + jnp.arange(3))[:, None, None, None, None]
  data = CalibData(xs, jnp.asarray([900.0, 500.0, 100.0]), None, jnp.arange(3))
  return qm, data


def test_eager_and_compiled_calibration_give_the_same_parameters(tiny):
  qm, data = tiny
  cands = 20   # fewer candidates than the benchmark's 100: same code path, faster eager loop
  cal = perf.jitted_calibration(qm, data, num_candidates=cands, batch_size=2)
  ew = perf.eager_weight_search(qm, num_candidates=cands, channel_fraction=0.25)
  ea = perf.eager_activation_search(qm, data, num_candidates=cands, num_steps=2, batch_size=2)
  agree_w = perf.compare_weight_ranges(cal, ew)
  agree_a = perf.compare_activation_ranges(cal, ea)
  # every weight op searched on a quarter of its channels; acts on 2 of 3 steps, all operands
  assert ew.units_done < ew.units_total and 0 < ew.fraction < 0.5
  assert ea.fraction == pytest.approx(2 / 3) and ea.timing().extrapolation == pytest.approx(1.5)
  n_act_operands = sum(len(calibrate_operands(op)) for op in qm.plan.ops)
  assert len(ea.ranges) == 2 * n_act_operands
  assert agree_w["count"] == ew.units_done
  # same search, same grid: identical up to float summation order (tolerance 1e-5 relative)
  assert agree_w["max_rel_diff"] < 1e-5, agree_w
  assert agree_a["max_rel_diff"] < 1e-5, agree_a
  assert agree_a["count"] >= 2 * n_act_operands


def calibrate_operands(op):
  from dqjax.calib import calibrate
  return calibrate._operands(op)


def test_agreement_check_detects_different_parameters(tiny):
  """The agreement check can fail: a 1 % change of one compiled scale is reported."""
  qm, data = tiny
  cal = perf.jitted_calibration(qm, data, num_candidates=10, batch_size=4)
  ea = perf.eager_activation_search(qm, data, num_candidates=10, num_steps=1)
  assert perf.compare_activation_ranges(cal, ea)["max_rel_diff"] < 1e-5
  path = next(p for p, st in cal.qstate.items() if st.acts)
  st = cal.qstate[path]
  name, act = next(iter(st.acts.items()))
  bad = st.replace_act(name, act.replace(qp=act.qp.replace(scale=act.qp.scale * 1.01)))
  cal = cal.replace(qstate={**cal.qstate, path: bad})
  assert perf.compare_activation_ranges(cal, ea)["max_rel_diff"] > 5e-3


def _ratios():
  return {"calib_speedup": perf.Ratio(40.0, "higher"), "sim_w8a8_over_fp": perf.Ratio(1.1, "lower"),
          "int8_bytes": perf.Ratio(4.0, "higher")}


def test_check_detects_a_planted_regression(tmp_path):
  path = str(tmp_path / "ratios.json")
  perf.save_ratios(path, _ratios(), {"config": "quick"})
  committed, meta = perf.load_ratios(path)
  assert meta == {"config": "quick"} and committed["calib_speedup"].value == 40.0
  assert perf.check_ratios(_ratios(), committed, 0.3) == []
  slower = dict(_ratios(), calib_speedup=perf.Ratio(20.0, "higher"))         # 50 % worse
  overhead = dict(_ratios(), sim_w8a8_over_fp=perf.Ratio(1.6, "lower"))      # 45 % worse
  within = dict(_ratios(), calib_speedup=perf.Ratio(30.0, "higher"))         # 25 % worse: tolerated
  assert [m.split(":")[0] for m in perf.check_ratios(slower, committed, 0.3)] == ["calib_speedup"]
  assert [m.split(":")[0] for m in perf.check_ratios(overhead, committed, 0.3)] == ["sim_w8a8_over_fp"]
  assert perf.check_ratios(within, committed, 0.3) == []
  # a planted regression in the file itself (committed value raised) is caught the same way
  obj = json.load(open(path))
  obj["ratios"]["int8_bytes"]["value"] = 8.0
  json.dump(obj, open(path, "w"))
  committed, _ = perf.load_ratios(path)
  assert any(m.startswith("int8_bytes") for m in perf.check_ratios(_ratios(), committed, 0.3))
  with pytest.raises(ValueError, match="tolerance"):
    perf.check_ratios(_ratios(), committed, 1.5)
  with pytest.raises(ValueError, match="better"):
    perf.Ratio(1.0, "sideways")


def test_check_cli_exits_nonzero_on_regression(tmp_path):
  path = str(tmp_path / "ratios.json")
  perf.save_ratios(path, _ratios())
  assert perf.check_against(_ratios(), path, 0.3) == 0
  assert perf.check_against(dict(_ratios(), calib_speedup=perf.Ratio(1.0, "higher")), path, 0.3) == 1


def test_report_has_the_expected_sections(tmp_path):
  t = perf.Timing([1.0, 1.2, 0.9], [2.0, 2.1, 1.9], [3.0, 3.1, 2.9]).to_dict()
  te = perf.Timing([5.0], [5.0], [2.0], extrapolation=4.0).to_dict()
  agree = {"max_rel_diff": 0.0, "fraction_equal": 1.0, "count": 3}
  results = {
      "config": "configs/perf/quick.py", "wall_s": 12.0, "machine": perf.machine_info(),
      "calibration": {"tiny": {"jit_cold": t, "jit_warm": t, "eager": te, "speedup_cold": 10.0,
                               "speedup_warm": 20.0, "speedup_cold_wall": 9.0, "agree_weights": agree,
                               "agree_acts": agree, "eager_fraction_w": 0.1, "eager_fraction_a": 0.5}},
      "sampling": {"tiny": {"fp": {"trace_lower_s": 1.0, "compile_s": 2.0, "run": t, "over_fp": 1.0},
                            "sim-W8A8": {"trace_lower_s": 1.0, "compile_s": 2.0, "run": t, "over_fp": 1.1}}},
      "memory": {"tiny": {"deploy-int8": {"fp32": 400, "codes": 100, "scales": 8, "codes_ratio": 4.0,
                                          "total_ratio": 3.7, "scale_share": 0.07}}},
      "scaling": {"samples": {"x": [4, 8, 16], "cpu": [1.0, 2.0, 4.1], "wall": [1.0, 2.0, 4.0],
                              "load": [1, 1, 1], "fit_cpu": perf.linear_fit([4, 8, 16], [1.0, 2.0, 4.1])}},
      "ratios": _ratios(), "optimisations": ["cached the compiled passes"],
  }
  md = perf.write_report(results, str(tmp_path))
  text = open(md).read()
  heads = [line[3:] for line in text.splitlines() if line.startswith("## ")]
  assert heads == list(perf.REPORT_SECTIONS)
  assert "Not run." in text.split("## Sharding")[1].split("##")[0]      # absent parts are said to be absent
  assert "×4 extrap." in text and "cached the compiled passes" in text
  for png in ("calibration.png", "sampling.png", "scaling_samples.png"):
    assert os.path.getsize(tmp_path / "perf" / png) > 1000


def test_linear_fit_and_timing_helpers():
  fit = perf.linear_fit([1, 2, 4, 8], [2.0, 4.0, 8.0, 16.0])
  assert fit["slope"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
  assert fit["loglog_exponent"] == pytest.approx(1.0)
  t = perf.measure(lambda: jnp.ones(3) * 2, repeats=3, warmup=1)
  assert len(t.wall) == 3 and all(w >= 0 for w in t.wall) and len(t.load) == 3
  a, b = perf.measure_pair(lambda: 1, lambda: 2, repeats=2, warmup=0)
  assert len(a.cpu) == len(b.cpu) == 2
  assert perf.Timing([1.0], [2.0], [0.0], extrapolation=3.0).cpu_median == pytest.approx(6.0)
  with pytest.raises(ValueError, match="sampling mode"):
    perf.mode_setting("W3A3")
  with pytest.raises(ValueError, match="width"):
    perf.width_unet(12)
