"""Methods compose: Q-Diffusion's calibration (shortcut split, BRECQ/AdaRound, learned activation steps),
then TDQ-style per-timestep activation tables, then a PTQD sampler correction — one recipe, no special
cases."""
import numpy as np

from configs.methods import ptqd as ptqd_cfg_mod
from configs.methods import q_diffusion as qd_cfg_mod
from configs.methods import tdq as tdq_cfg_mod
from dqjax.calib import noise_stats as ns
from dqjax.methods import ptqd, q_diffusion, recipe, tdq
from tests.methods import correction_nets as cn


def test_qdiffusion_then_tdq_tables_then_ptqd_correction():
  model, params, ex = cn.mini()
  # PLMS injects no noise, so the corrected sampler compiles no random draws; PTQD's correction acts through
  # k_t and b_t, as it did with the η = 0 DDIM used before (no injected noise to absorb variance into either)
  env = cn.env(4, "plms")
  data = cn.fp_calib(env, model, params, n=4)
  qd = qd_cfg_mod.get_config()
  qd.iters_w, qd.iters_a = 4, 4
  # the mechanism at a fraction of the compile time: one reconstructed layer-block (both BRECQ phases run on
  # it; conv_in, whose input capture is the model input itself), minmax initialisation, only the time embedding
  # and conv_in/conv_out quantized (the composition does not depend on which layers are, and every quantized
  # layer adds to each compiled pass), a small calibration set and few noise-statistics samples
  qd.recon_only = "conv_in"
  qd.weight_init = qd.act_init = "minmax"
  qd.keep_fp = ("resnets_0/.*", "attn1/.*")
  td = tdq_cfg_mod.get_config()
  td.iters, td.progress = 5, False
  td.depth = 0                        # intervals linear in the Fourier features: no random init draws to compile
  pc = ptqd_cfg_mod.get_config()
  pc.stats_samples = 4                # the calibration set's noise shape: its compiled draw is reused
  composed = recipe.Recipe(
      "q_diffusion+tdq+ptqd", "composed", recipe.build("q_diffusion", qd).rules,
      recipe.chain(q_diffusion.passes(qd), tdq.tdq_pass(td), ptqd.correction_pass(pc)))
  qm = composed(model, params, ex, data, w_bits=4, a_bits=8, env=env)
  # Q-Diffusion: learned rounding on the reconstructed layers
  assert qm.qstate["conv_in"].rounding is not None
  assert {"weights:conv_in", "acts:conv_in"} <= set(qm.meta["reconstruction"])
  # TDQ: the activation quantizers are per-timestep tables that differ across t
  act = qm.qstate["conv_in"].acts["input"]
  assert act.index is not None and act.qp.scale.shape[0] > 1
  assert np.ptp(np.asarray(act.qp.scale)) > 0
  # PTQD: a sampler correction is attached and changes the samples
  assert [c.name for c in qm.corrections] and "ptqd" in qm.corrections[0].name
  x, conds, key = ns.initial_state(qm, 4, 1)
  plain = ns.sample_fn(qm, qm.denoiser())(x, conds, key).x0
  corrected = ns.sample_fn(qm, qm.denoiser(), correction=qm.correction)(x, conds, key).x0
  assert np.all(np.isfinite(corrected)) and not np.allclose(plain, corrected)
