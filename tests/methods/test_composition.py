"""Methods compose: Q-Diffusion's calibration (shortcut split, BRECQ/AdaRound, learned activation steps),
then TDQ-style per-timestep activation tables, then a PTQD sampler correction — one recipe, no special
cases."""
import jax
import jax.numpy as jnp
import numpy as np

from configs.methods import ptqd as ptqd_cfg_mod
from configs.methods import q_diffusion as qd_cfg_mod
from configs.methods import tdq as tdq_cfg_mod
from dqjax.calib import noise_stats as ns
from dqjax.methods import ptqd, q_diffusion, recipe, tdq
from tests.methods import correction_nets as cn


def test_qdiffusion_then_tdq_tables_then_ptqd_correction():
  model, params, ex = cn.mini()
  env = cn.env(4)
  data = cn.fp_calib(env, model, params, n=4)
  qd = qd_cfg_mod.get_config()
  qd.iters_w, qd.iters_a = 4, 4
  # the mechanism at a fraction of the compile time: one reconstructed layer-block (both BRECQ phases run on
  # it), minmax initialisation, a small calibration set and few noise-statistics samples
  qd.recon_only = "conv_out"
  qd.weight_init = qd.act_init = "minmax"
  td = tdq_cfg_mod.get_config()
  td.iters, td.progress = 5, False
  pc = ptqd_cfg_mod.get_config()
  pc.stats_samples = 8
  composed = recipe.Recipe(
      "q_diffusion+tdq+ptqd", "composed", recipe.build("q_diffusion", qd).rules,
      recipe.chain(q_diffusion.passes(qd), tdq.tdq_pass(td), ptqd.correction_pass(pc)))
  qm = composed(model, params, ex, data, w_bits=4, a_bits=8, env=env)
  # Q-Diffusion: learned rounding on the reconstructed layers
  assert qm.qstate["conv_out"].rounding is not None
  assert {"weights:conv_out", "acts:conv_out"} <= set(qm.meta["reconstruction"])
  # TDQ: the activation quantizers are per-timestep tables that differ across t
  act = qm.qstate["conv_out"].acts["input"]
  assert act.index is not None and act.qp.scale.shape[0] > 1
  assert np.ptp(np.asarray(act.qp.scale)) > 0
  # PTQD: a sampler correction is attached and changes the samples
  assert [c.name for c in qm.corrections] and "ptqd" in qm.corrections[0].name
  x, conds, key = ns.initial_state(qm, 4, 1)
  plain = ns.sample_fn(qm, qm.denoiser())(x, conds, key).x0
  corrected = ns.sample_fn(qm, qm.denoiser(), correction=qm.correction)(x, conds, key).x0
  assert np.all(np.isfinite(corrected)) and not np.allclose(plain, corrected)
