"""PTQ4DiT: post-training quantization for diffusion transformers (Wu et al., NeurIPS 2024, arXiv 2405.16005;
code adreamwu/PTQ4DiT).

Implemented:
* **Channel-wise Salience Balancing (CSB)** on the inputs of qkv, proj and fc1 of every block: with
  weight salience s_W,j = max_o |W[j, o]| (to_q/to_k/to_v read the same tensor and share one factor,
  their kernels concatenated as the fused qkv of the paper) and activation salience s_X[b, j] = max over
  tokens |X[b, :, j]| per calibration sample, λ_j = √(s̄_X,j / s_W,j); X/λ and diag(λ)W then both have
  salience √(s̄_X s_W).
* **Spearman-ρ-guided Salience Calibration (SSC)**: s̄_X = Σ_b η_b s_X[b] with η = softmax(−ρ_b), ρ_b the
  Spearman rank correlation between sample b's activation salience and the weight salience — samples
  (timesteps) whose outliers are complementary to the weight's get more weight. Per sample, as the code
  (`ssc_unit='sample'`); the paper's per-timestep form is `ssc_unit='step'`.
* **Offline re-parameterization** (`reparam=True`): λ of qkv is folded into the adaLN rows producing
  shift_msa/scale_msa (shift' = shift/λ, 1 + scale' = (1 + scale)/λ), λ of fc1 into shift_mlp/scale_mlp,
  λ of proj into the V projection's output columns (softmax·V is linear per channel). All exact in float
  (tested ≤ 1e-4); no online divide remains.
* Quantizers as the code: every Linear/Conv quantized (embedders, adaLN and final layer included),
  per-output-channel asymmetric weights, per-tensor asymmetric static activations, q/k/v and the softmax
  (unsigned) quantized; ranges by the L2 (weights) / Lp shrink search (activations); optionally followed
  by BRECQ block reconstruction with AdaRound (`recon_iters` > 0, blocks = DiT blocks).

Deviations: the paper's released code divides X by λ online at run time (its re-parameterization is a
README TODO); we fold, which is what the paper describes. Weight ranges come from the shared MSE
shrink search instead of the code's three-percentile pick. Reconstruction is off by default on CPU
(paper: 20k iterations per block, batch 32); the config keeps the paper's values in comments.
"""
from __future__ import annotations

import jax.numpy as jnp

from dqjax.calib import reconstruct as recon
from dqjax.calib import smoothing as sm
from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant.spec import QuantSpec

FAMILY = "dit_ptq/channel_equalization"


def csb_ssc_factors(sx, sw, *, ssc: bool = True, temperature: float = 1.0):
  """λ for one group from per-row activation saliences `sx` [B, C] and the weight salience `sw` [C]
  (rows = samples or steps). Returns (λ, η or None)."""
  if ssc:
    eta = sm.ssc_weights(sx, sw, temperature)
    sbar = jnp.sum(eta[:, None] * sx, axis=0)
  else:
    eta, sbar = None, jnp.max(sx, axis=0)
  return sm.balance_factors(sbar, sw, 0.5, 0.5), eta


def csb_ssc_pass(*, kinds=("qkv", "proj", "fc1"), ssc: bool = True, ssc_unit: str = "sample",
                 temperature: float = 1.0, reparam: bool = True, samples_per_step=None):
  """Pass: CSB + SSC on the DiT groups `kinds`, then (optionally) offline re-parameterization."""
  if ssc_unit not in ("sample", "step"):
    raise ValueError(f"ssc_unit={ssc_unit!r} is unknown; accepted values: sample, step")

  def run(qm, data):
    groups = sm.dit_groups(qm.plan, kinds)
    if not groups:
      return qm
    stats = sm.channel_absmax(qm, sm.paired_subset(data, samples_per_step),
                              [g.paths[0] for g in groups])
    info = {}
    for g in groups:
      s = stats[g.paths[0]]                                   # [S, N, C]
      sx = jnp.max(s, axis=1) if ssc_unit == "step" else s.reshape(-1, s.shape[-1])
      sw = sm.weight_salience([sm.kernel_of(qm, p) for p in g.paths])
      lam, eta = csb_ssc_factors(sx, sw, ssc=ssc, temperature=temperature)
      qm = sm.smooth_group(qm, g, lam)
      info[g.name] = {"lambda_max": float(jnp.max(lam)), "lambda_min": float(jnp.min(lam)),
                      "rho_mean": float(jnp.mean(sm.spearman(sx, sw)))}
    if reparam:
      for g in groups:
        qm = sm.fold_group(qm, g)
    return qm.replace(meta={**qm.meta, "ptq4dit": info})

  return run


def _rules(config):
  def rules(w_bits, a_bits, model_family="dit"):
    w = QuantSpec("int", w_bits, symmetric=common.config_get(config, "w_symmetric", False),
                  granularity="channel", axis=-1)
    a = None if a_bits >= 16 else QuantSpec("int", a_bits, symmetric=False, granularity="tensor")
    probs = None if a_bits >= 16 else QuantSpec("int", common.config_get(config, "softmax_bits", a_bits),
                                                symmetric=True, signed=False, granularity="tensor")
    mm = a if common.config_get(config, "quantize_matmuls", True) else None
    keep = sm.skip_patterns(model_family, tuple(common.config_get(config, "keep_fp", ())))
    return sm.build_rules(w, a, keep_fp=keep, matmul_act=mm, softmax_act=probs if mm is not None else None)
  return rules


@register("ptq4dit", family=FAMILY, model_families=("dit",),
          paper="PTQ4DiT (Wu et al., NeurIPS 2024, arXiv 2405.16005)")
def ptq4dit(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  passes = [
      csb_ssc_pass(kinds=tuple(get("kinds", ("qkv", "proj", "fc1"))), ssc=get("ssc", True),
                   ssc_unit=get("ssc_unit", "sample"), temperature=get("temperature", 1.0),
                   reparam=get("reparam", True), samples_per_step=get("ssc_samples_per_step", None)),
      common.calibrate_weights_pass(get("weight_method", "mse"), num_candidates=get("candidates", 100), p=2.0),
      common.calibrate_activations_pass(get("act_method", "mse"), batch_size=get("batch_size", None),
                                        num_candidates=get("candidates", 100), p=get("act_p", 2.4)),
  ]
  iters = int(get("recon_iters", 0))
  if iters > 0:
    cfg = recon.ReconConfig(iters=iters, batch_size=get("recon_batch", 32), progress=False,
                            num_samples=get("recon_samples", None))
    passes.append(recon.reconstruction_pass(cfg, phase="weights",
                                            blocks=lambda qm: recon.partition(qm.plan, recon.DIT_BLOCKS)))
  return Recipe("ptq4dit", FAMILY, _rules(config), chain(*passes),
                "CSB + Spearman-weighted SSC balancing folded into adaLN / V, per-channel W, per-tensor A")
