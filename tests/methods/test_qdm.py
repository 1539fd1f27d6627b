"""Q-DM: timestep-aware quantization (per-step standardisation + one shared LSQ quantizer) and NeM QAT."""
import jax.numpy as jnp
import numpy as np

from dqjax.quant import tables
from dqjax.transform import hooks
from tests.methods.qat_nets import ENV, run


def test_qdm_taq_standardises_per_timestep_and_trains_with_nem():
  qm = run("qdm", 4, 4, steps=6, lr_weights=1e-3)
  op, st = qm.plan["conv_mid"], qm.qstate["conv_mid"]
  taq = st.extra["taq"]
  mu, sigma = np.asarray(taq["mu"]["input"]), np.asarray(taq["sigma"]["input"])
  assert mu.shape == sigma.shape == (ENV.sampler.num_steps,)
  assert np.ptp(sigma) > 0                                            # statistics differ between timesteps
  assert st.acts["input"].index is None and st.acts["input"].qp.scale.size == 1   # one shared quantizer
  scale = float(st.acts["input"].qp.scale.reshape(()))
  x = jnp.linspace(-3, 3, 2 * 8 * 8 * 8).reshape(2, 8, 8, 8)
  for t in (750.0, 0.0):
    xq = hooks._taq_call(lambda a, **k: a, (x,), {}, op, st, jnp.full((2,), t))
    e = tables.lookup({"mu": taq["mu"]["input"], "sigma": taq["sigma"]["input"]}, taq["index"], t)
    levels = (np.asarray(xq) - float(e["mu"])) / float(e["sigma"]) / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)   # on the grid μ_t + σ_t·s·k
    assert levels.min() >= -8 - 1e-3 and levels.max() <= 7 + 1e-3
  hist = qm.meta["distill"]["history"]
  assert {"output", "diffusion"} <= set(hist[-1][1])                   # NeM + the ε-prediction loss
  assert qm.meta["distill"]["order"] == "forward"
  assert qm.meta["distill"]["trained_leaves"]["weights"] > 0
  assert isinstance(qm, hooks.QATModel)
