"""TuneQDM: frozen integer weights, separable scales, timestep experts selected inside the forward."""
import jax.numpy as jnp
import numpy as np

from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from tests.methods.qat_nets import X, run


def test_tuneqdm_scale_only_timestep_experts():
  qm = run("tuneqdm", 4, 16, steps=8, lr=1e-3)
  ex = qm.qstate["conv_mid"].extra["tuneqdm"]
  assert ex["d_out"].shape[0] == 4 and ex["d_in"].shape == (4, 1, 1, 8, 1)
  codes = np.asarray(ex["codes"])
  np.testing.assert_array_equal(codes, np.round(codes))               # W_int − z stays integer
  assert np.abs(codes).max() <= 15
  for p in qm.plan.paths:                                              # no float weight trains
    if qm.plan[p].info.weight_shape is not None:
      np.testing.assert_array_equal(np.asarray(qapply.get_kernel(qm.params, p)),
                                    np.asarray(qapply.get_kernel(qm.fp_params, p)))
  trained = qm.meta["distill"]["trained_leaves"]
  assert trained == {"scales": 2 * 7, "acts": 0}
  # the trajectory visits t = 750, 500, 250, 0: every expert is trained, so the experts now differ
  d_out = np.asarray(ex["d_out"])
  assert not np.allclose(d_out[0], d_out[3])
  # expert i = floor(t·4/1000): changing expert 0 changes the output at t < 250 only
  st = qm.qstate["conv_mid"]
  bumped = {**ex, "d_out": ex["d_out"].at[0].multiply(1.5)}
  qs = {**qm.qstate, "conv_mid": st.replace(extra={**st.extra, "tuneqdm": bumped})}
  for t, moved in ((100.0, True), (600.0, False)):
    tt = jnp.full((2,), t)
    a = hooks.qat_apply(qm.model, qm.plan, qm.params, qm.qstate, X + 0.3, tt)
    b = hooks.qat_apply(qm.model, qm.plan, qm.params, qs, X + 0.3, tt)
    assert bool(jnp.any(a != b)) == moved
