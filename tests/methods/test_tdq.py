"""TDQ: the MLP's frozen interval table follows how activation ranges change with t."""
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import calibrate
from dqjax.methods import recipe
from dqjax.methods.tdq import fourier_encoding, train_tdq
from dqjax.quant import tables
from tests.methods import correction_nets as cn
from tests.methods.unet_ptq_nets import trajectory

# the mini U-Net (conv_in, a ResBlock, attention, conv_out) compiles several times faster than tiny_unet
# and has the same kinds of static activation quantizers


@pytest.fixture(scope="module")
def setup():
  model, params, ex = cn.mini()
  data = trajectory(steps=6, n=8, growth=1.0)        # the input's spread is 6x larger at t=950 than at t=50
  return model, params, ex, data


def test_tdq_table_varies_with_t_and_tracks_the_ranges(setup):
  model, params, ex, data = setup
  from configs.methods.tdq import get_config
  c = get_config()
  c.weight_init, c.act_init, c.iters, c.lr, c.progress = "minmax", "minmax", 120, 1e-2, False
  qm = recipe.build("tdq", c)(model, params, ex, data, w_bits=8, a_bits=4)
  act = qm.qstate["conv_in"].acts["input"]
  assert act.qp.scale.shape[0] == 6 and act.index is not None         # one entry per timestep
  s = {int(t): float(np.ravel(tables.lookup(act.qp, act.index, jnp.asarray(t)).scale)[0])
       for t in np.asarray(data.ts)}
  ts = sorted(s)
  assert s[ts[-1]] > 2.0 * s[ts[0]]                   # wider interval where the input is wider
  assert np.all(np.diff([s[t] for t in ts]) > 0)      # and monotone in t, as the planted ranges
  first, last = qm.meta["tdq_loss"]
  assert last < first


def test_tdq_starts_from_the_static_interval_and_checks_objective(setup):
  model, params, ex, data = setup
  # same plan and data as above: the calibration passes reuse the compiled programs
  qm = recipe.prepare(model, params, recipe.build("tdq").rules(8, 4), ex)
  qm = calibrate.calibrate_activations(calibrate.calibrate_weights(qm, "minmax"), data, "minmax")
  with pytest.raises(ValueError, match="objective"):
    train_tdq(qm, data, objective="kl")
  mlp, p, quants, hist = train_tdq(qm, data, iters=0, progress=False)
  assert hist == []
  offs = mlp.apply({"params": p}, fourier_encoding(jnp.asarray([10.0, 900.0]), 1000))
  assert offs.shape == (2, len(quants)) and float(jnp.max(jnp.abs(offs))) < 0.05   # ~ static at the start
