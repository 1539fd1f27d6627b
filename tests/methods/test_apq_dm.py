"""APQ-DM: contiguous timestep groups that find a planted change of the activation distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib.data import CalibData
from dqjax.methods import recipe
from dqjax.methods.apq_dm import contiguous_groups, group_table, mmd_select
from dqjax.quant import tables
from tests.methods import correction_nets as cn


def test_contiguous_groups_are_optimal_segments():
  rng = np.random.default_rng(0)
  feats = np.concatenate([rng.normal(0, 0.1, (5, 3)), rng.normal(4, 0.1, (3, 3)), rng.normal(-3, 0.1, (4, 3))])
  labels = contiguous_groups(feats, 3)
  assert labels.tolist() == [0] * 5 + [1] * 3 + [2] * 4
  for g in (1, 2, 5):
    lab = contiguous_groups(rng.normal(size=(9, 2)), g)
    assert np.all(np.diff(lab) >= 0) and np.all(np.diff(lab) <= 1) and lab[-1] == g - 1   # contiguous
  with pytest.raises(ValueError, match="num_groups"):
    contiguous_groups(feats, 13)
  spec = group_table(np.linspace(950, 50, 12), labels)
  assert spec.kind == "groups" and len(spec.boundaries) == 2
  assert np.all(np.diff(spec.boundaries) > 0)
  sel = mmd_select(feats, labels, 4)
  assert len(sel) == 4 and set(labels[sel]) == {0, 1, 2}          # every group gets calibration data


def test_planted_distribution_change_gives_two_groups_and_two_scales():
  model, params, ex = cn.mini()           # the mini U-Net: its compiles cost a fraction of tiny_unet's
  steps, n = 8, 8
  spread = np.where(np.arange(steps) < 5, 6.0, 1.0)[:, None, None, None, None]   # changes after step 4
  # numpy draws: a 5-D jax.random.normal compiles for seconds
  xs = (np.random.default_rng(0).normal(size=(steps, n, 8, 8, 2)) * spread).astype(np.float32)
  data = CalibData(*jax.device_put((xs, np.linspace(950.0, 50.0, steps).round().astype(np.float32))), None,
                   jax.device_put(np.arange(steps)))
  from configs.methods.apq_dm import get_config
  c = get_config()
  c.num_groups, c.calib_steps, c.weight_init, c.act_init = 2, 4, "minmax", "minmax"
  qm = recipe.build("apq_dm", c)(model, params, ex, data, w_bits=8, a_bits=8)
  assert qm.meta["apq_groups"] == [0] * 5 + [1] * 3
  t4, t5 = float(data.ts[4]), float(data.ts[5])
  (b,) = qm.meta["apq_boundaries"]
  assert t5 < b <= t4                                              # the boundary falls at the change
  act = qm.qstate["conv_in"].acts["input"]
  assert act.qp.scale.shape[0] == 2
  hi = tables.lookup(act.qp, act.index, jnp.asarray(900.0)).scale
  lo = tables.lookup(act.qp, act.index, jnp.asarray(100.0)).scale
  assert float(jnp.ravel(hi)[0]) > 3 * float(jnp.ravel(lo)[0])     # one scale per group, wide where x is
  assert set(np.asarray(qm.meta["apq_groups"])[qm.meta["apq_steps"]]) == {0, 1}
