"""Shared pieces of the error-correction family (PTQD, D²-DPM, TaC-QDM, QNCD, SBC) and the text-image
methods built on the same base quantizer (DGQ, PCR).

- `affine_correction`: every sampler correction of this family is, per sampler step and channel, an affine
  map of the quantized ε plus a change of the injected noise variance:

      ε' = a_i ⊙ ε_q + m_i,   noise_var_delta = v_i

  PTQD (a = 1/(1+k), m = −b/(1+k), v = −c²σ²/(1+k)²), D²-DPM (a = 1 − β, m = −(μ_Y − β μ_X), v = ∓c²σ²_{Y|X}),
  TaC-QDM (a = K, m = −(input bias of the next call)/c) and QNCD (a = 1, m = −μ_q) only estimate different
  tables. One compiled function serves them all; the tables are looked up by the sampler's call index
  (nearest timestep when the step count differs).
- `base_rules` / `base_passes`: the quantized model the corrections act on — the core's MSE-searched PTQ
  (per-channel weights, Lp(2.4)-searched per-tensor activations), with each paper's choice of layers kept
  in float or at 8 bits, and optional BRECQ/AdaRound reconstruction (`use_adaround`) through
  `dqjax.calib.reconstruct`.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from dqjax.calib import noise_stats
from dqjax.calib import reconstruct as rc
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config
from dqjax.methods.recipe import SamplerCorrection

CORRECTION_NAMES = ("ptqd", "d2_dpm", "tac_qdm", "qncd")


def _affine_fn(state, eps, info):
  i = noise_stats.step_entry(state["ts"], info)
  out = eps * state["scale"][i] + state["shift"][i]
  return out.astype(eps.dtype), state["var"][i]


for _name in CORRECTION_NAMES:          # known by name for checkpoints, before any recipe runs
  SamplerCorrection(_name, _affine_fn, None)


def affine_correction(name: str, ts, *, scale=None, shift=None, var=None) -> SamplerCorrection:
  """A per-step affine ε correction. `ts` [S] are the sampler's model timesteps; `scale`/`shift` are [S] or
  [S, C] (default 1 / 0), `var` (added to the injected noise variance, in x units) [S] or [S, C]."""
  ts = jnp.asarray(ts, jnp.float32)
  s = ts.shape[0]
  def table(v, default):
    v = jnp.full((s,), default, jnp.float32) if v is None else jnp.asarray(v, jnp.float32)
    if v.shape[0] != s:
      raise ValueError(f"correction table has {v.shape[0]} entries; the sampler makes {s} model calls")
    return v
  state = {"ts": ts, "scale": table(scale, 1.0), "shift": table(shift, 0.0), "var": table(var, 0.0)}
  for k, v in state.items():
    if not np.all(np.isfinite(np.asarray(v))):
      raise ValueError(f"correction {name!r}: table {k!r} has non-finite entries (degenerate ε statistics)")
  return SamplerCorrection(name, _affine_fn, state)


def attach(qm, correction: SamplerCorrection, **meta):
  """The QModel with `correction` appended to its sampler corrections (and report numbers in meta)."""
  return qm.replace(corrections=tuple(qm.corrections) + (correction,),
                    meta={**qm.meta, **meta})


# --- the base quantized model ---------------------------------------------------------------------------------
# PTQD / D²-DPM (BRECQ code): skip 1x1 and downsample convs stay float; time_embed[0], conv_in, conv_out at
# 8 bits; attention matmuls not quantized.
PTQD_KEEP_FP = (r".*conv_shortcut", r".*downsamplers_0/conv")
PTQD_EIGHT_BIT = (r"time_embedding/linear_1", r"conv_in", r"conv_out")


def base_rules(config, **defaults):
  """rules(w_bits, a_bits, family) of the base PTQ; keyword defaults are the paper's choices, any config
  field of the same name overrides them (see `_unet_ptq.rules_from_config`)."""
  return rules_from_config(config, **defaults)


def base_passes(config, *, weight_init: str = "mse", act_init: str = "mse") -> list:
  """Weights (Lp search, optional AdaRound block reconstruction), then activations (Lp(2.4) search,
  optional learned step sizes)."""
  get = lambda k, d: common.config_get(config, k, d)
  passes = [common.calibrate_weights_pass(get("weight_init", weight_init), p=2.0)]
  if get("use_adaround", False):
    passes.append(rc.reconstruction_pass(
        rc.config_from(config, "recon_", rc.ReconConfig(iters=200, lr_w=1e-2, num_samples=256)), phase="weights"))
  acts = common.calibrate_activations_pass(get("act_init", act_init), p=2.4, batch_size=get("calib_batch", None))

  def act_pass(qm, data):
    if qm.meta.get("a_bits", 8) >= 16:
      return qm
    qm = acts(qm, data)
    if get("learn_act_steps", False):
      qm = rc.reconstruction_pass(rc.config_from(config, "recon_a_", rc.ReconConfig(
          iters=100, lr_a=4e-4, schedule_a="cosine", p=2.4, num_samples=256)), phase="acts")(qm, data)
    return qm

  return passes + [act_pass]


def stats_samples(config, default: int = 64) -> int:
  return int(common.config_get(config, "stats_samples", default))


def stats_seed(config, qm) -> int:
  seed = common.config_get(config, "stats_seed", None)
  return int(qm.env.seed if seed is None else seed) + 1


def optional_int(v) -> Optional[int]:
  return None if v is None else int(v)
