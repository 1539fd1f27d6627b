"""PCR: progressive calibration re-calibrates the later steps on the quantized model's own trajectory (the
first stage keeps its FP-trajectory tables), and activation relaxing runs the most sensitive steps with
float activations."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate
from dqjax.calib import noise_stats as ns
from dqjax.methods import recipe
from dqjax.methods.pcr import PER_STEP, merge_entries
from tests.methods import correction_nets as cn


def test_progressive_stages_and_relaxing():
  model, params, ex = cn.mini(text=True)
  e = cn.text_env(4)
  data = cn.fp_calib(e, model, params, n=4)
  cfg = {"num_stages": 2, "traj_samples": 4, "stats_samples": 4, "relax_fraction": 0.25, "act_init": "minmax"}
  qm = recipe.build("pcr", cfg)(model, params, ex, data, w_bits=8, a_bits=4, env=e)
  assert qm.meta["pcr_stages"] == [0, 2]
  # the reference: the same model calibrated on the FP trajectory only (stage 0)
  base = recipe.prepare(model, params, recipe.build("pcr").rules(8, 4), ex, warn_unused=False).replace(env=e)
  base = calibrate.calibrate_weights(base, "mse", p=2.0)
  x, conds, key = ns.initial_state(base, 4, 1)          # stats_seed = env seed + 1
  fp = ns.sample_fn(base, base.denoiser("fp"))(x, conds, key)
  base = calibrate.calibrate_activations(base, ns.as_calib_data(base, fp.trajectory.xs, fp.trajectory.ts, conds),
                                         "minmax", table=PER_STEP)
  s_q = np.asarray(qm.qstate["attn2/to_k"].acts["input"].qp.scale)
  s_b = np.asarray(base.qstate["attn2/to_k"].acts["input"].qp.scale)
  # to_k sees the text states only: identical on both trajectories
  np.testing.assert_allclose(s_q, s_b, rtol=1e-6)
  s_q = np.asarray(qm.qstate["resnets_0/conv1"].acts["input"].qp.scale).reshape(4)
  s_b = np.asarray(base.qstate["resnets_0/conv1"].acts["input"].qp.scale).reshape(4)
  np.testing.assert_allclose(s_q[:2], s_b[:2], rtol=1e-6)              # stage 0: FP-trajectory tables
  assert not np.allclose(s_q[2:], s_b[2:], rtol=1e-4)                  # stage 1: the quantized trajectory
  # relaxing: one of the four calls (the largest ε error) runs with float activations
  relaxed = qm.meta["pcr_relaxed_t"]
  err = np.asarray(qm.meta["pcr_step_error"])
  assert len(relaxed) == 1 and relaxed[0] == float(np.asarray(fp.trajectory.ts)[np.argmax(err)])
  t_r = jnp.full((2,), relaxed[0])
  xx, cc = data.xs[0][:2], data.conds[0][:2]
  float_acts = qm.replace(qstate={p: st.replace(acts={}, extra={}) for p, st in qm.qstate.items()},
                          plan=recipe.prepare(model, params, recipe.build("pcr").rules(8, 16), ex,
                                              warn_unused=False).plan)
  run = lambda m: jax.jit(lambda *a: m.apply(*a))(xx, t_r, cc)     # jitted: one compile beats eager op-by-op
  np.testing.assert_allclose(run(qm), run(float_acts), atol=1e-5)


def test_merge_entries_selects_by_mask():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=4)
  qm = recipe.prepare(model, params, recipe.build("pcr").rules(8, 8), ex, warn_unused=False)
  a = calibrate.calibrate_activations(qm, data, "minmax", table=PER_STEP)
  b = calibrate.calibrate_activations(qm, data.replace(xs=data.xs * 2.0), "minmax", table=PER_STEP)
  m = merge_entries(a, b, np.array([False, True, False, True]))
  sa, sb, sm = (np.asarray(q.qstate["conv_in"].acts["input"].qp.scale).reshape(4) for q in (a, b, m))
  np.testing.assert_allclose(sm, np.where([False, True, False, True], sb, sa))
