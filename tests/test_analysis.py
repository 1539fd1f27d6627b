"""Error analysis: the per-step ε error profile separates shared (sample-independent) error from noise."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.analysis import errors
from dqjax.calib import calibrate
from dqjax.calib.data import CalibData


class _Linear:
  def apply(self, variables, x, t, c=None):
    return x * variables["params"]["w"]


def _fake_qm(perturb):
  model, params = _Linear(), {"w": jnp.float32(2.0)}
  return types.SimpleNamespace(model=model, fp_params=params,
                               apply=lambda x, t, c=None: perturb(model.apply({"params": params}, x, t)))


def test_step_error_profile_measures_error_and_its_shared_part():
  xs = jax.random.normal(jax.random.key(0), (3, 64, 4, 4, 1))
  data = CalibData(xs, jnp.array([900.0, 500.0, 100.0]))
  shifted = errors.step_error_profile(_fake_qm(lambda e: e + 0.2), data)   # every sample moved the same way
  assert [s["t"] for s in shifted] == [900.0, 500.0, 100.0]
  for s, x in zip(shifted, xs):
    np.testing.assert_allclose(s["shared_share"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(s["rel_error"], 0.04 / float(jnp.mean((2 * x) ** 2)), rtol=1e-4)
  noise = jax.random.normal(jax.random.key(1), xs.shape[1:]) * 0.2
  independent = errors.step_error_profile(_fake_qm(lambda e: e + noise), data)   # independent per sample
  assert all(s["shared_share"] < 0.1 for s in independent)                     # ≈ 1/64 expected
  table = errors.step_error_table({"shift": shifted, "noise": independent})
  assert table.splitlines()[-1].startswith("| mean | ") and "shift: shared share" in table


def test_activation_ranges_of_a_weight_only_plan_are_empty_not_an_error():
  from dqjax.methods import recipe
  from tests.methods import correction_nets as cn
  model, params, ex = cn.mini()
  qm = recipe.prepare(model, params, recipe.build("minmax").rules(4, 16), ex, warn_unused=False)
  assert not any(op.acts for op in qm.plan.ops)                       # A16: nothing observed
  data = CalibData(jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 2)), jnp.array([900.0, 100.0]))
  assert errors.activation_ranges_over_time(qm, data) == {}
  prof = errors.step_error_profile(calibrate.calibrate_weights(qm, "minmax"), data)
  assert len(prof) == 2 and all(0 < s["rel_error"] < 1 for s in prof)     # 4-bit weights: some error


def test_error_trajectory_plot_gives_every_method_its_own_look(tmp_path):
  looks = errors.line_looks(12, [f"C{i}" for i in range(10)])
  assert len(set(looks)) == 12 and looks[10] == ("C0", "--")
  with pytest.raises(ValueError, match="more than 10 colours"):
    errors.line_looks(41, [f"C{i}" for i in range(10)])
  rows = [dict(model="m", setting="W4A4", method=f"q{i}", traj_mse=[0.0] + [0.1 * (i + 1)] * 5) for i in range(12)]
  path = errors.plot_error_trajectories(rows, str(tmp_path / "t.png"), model="m", setting="W4A4")
  assert os.path.getsize(path) > 1000
  grid = errors.comparison_grid({"minmax": np.zeros((8, 32, 32, 1)), "FP": np.ones((8, 32, 32, 1))},
                                str(tmp_path / "g.png"))
  assert os.path.getsize(grid) > 1000
