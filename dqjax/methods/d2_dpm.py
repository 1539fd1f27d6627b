"""D²-DPM: Dual Denoising for Quantized Diffusion Probabilistic Models (Zeng et al., AAAI 2025; arXiv 2501.08180;
TaylorJocelyn/D2-DPM).

Implemented (following `quant_scripts/gaussian_modeling.py`, `channel_wise_gaussian.py` and the samplers in
`ldm/models/diffusion/ddim.py`):
- timestep-aware joint Gaussian model of the quantized output X = ε_q and its quantization noise Y = Δ: per
  sampler step — and per latent channel in the channel-wise variants — elements with |Δ − mean| > 4σ are
  dropped, then mean μ = (μ_X, μ_Y) and covariance Σ (unbiased) are fitted (`noise_stats.joint_gaussian`);
- dual denoising in the sampler, with ρ = Σ_XY/(σ_X σ_Y) clipped to ±0.9999:
      μ_{Y|X} = μ_Y + ρ σ_Y/σ_X (ε_q − μ_X),   σ_{Y|X} = σ_Y √(1 − ρ²)
  * 'deterministic' (D-D², the "implicit" samplers): ε' = ε_q − μ_{Y|X}, and the remaining noise variance
    (c_i σ_{Y|X})² is absorbed into the step's injected noise (σ_t' = 0 when it exceeds σ_t), c_i being ε's
    coefficient in the update;
  * 'stochastic' (S-D², the "explicit" samplers): ε' = ε_q − (μ_{Y|X} + σ_{Y|X} z). The sampled term enters
    the next state as c_i σ_{Y|X} z, an independent Gaussian, so it is realised as extra injected noise
    variance (c_i σ_{Y|X})² drawn by the sampler from its own key (same distribution, deterministic seeds).
  The active script uses the channel-wise D-D² sampler, our default (`variant`, `per_channel`).
- base quantizer identical to PTQD's (the repo is a PTQD fork): skip/downsample convs float, time-embedding
  first layer, conv_in, conv_out at 8 bits, attention matmuls float.

Deliberate deviations: per-channel MSE weights without reconstruction by default (`use_adaround` enables the
BRECQ/AdaRound engine; the code: per-tensor weights, 10000 AdaRound iterations); the statistics come from
`stats_samples` fresh FP trajectories at every sampler step (the code: 1024 calibration samples of a 20-step
trajectory); the S-D² noise is drawn by the sampler (see above). With samplers that inject no noise (PLMS,
DPM-Solver++, η = 0 DDIM for D-D²'s absorption) only the mean correction acts — S-D² still injects its noise
under DDIM/DDPM (the core injects noise whenever a correction is present).
"""
from __future__ import annotations

import numpy as np

from dqjax.calib import noise_stats as ns
from dqjax.methods import common
from dqjax.methods._correction import (PTQD_EIGHT_BIT, PTQD_KEEP_FP, affine_correction, attach, base_passes,
                                       base_rules, stats_samples, stats_seed)
from dqjax.methods.recipe import Recipe, chain, register

VARIANTS = ("deterministic", "stochastic")


def d2_correction(pairs: ns.EpsPairs, *, variant: str = "deterministic", per_channel: bool = True,
                  outlier_std: float = 4.0, rho_max: float = 0.9999):
  """(SamplerCorrection, report) from side-by-side ε pairs."""
  if variant not in VARIANTS:
    raise ValueError(f"D2-DPM variant={variant!r} is unknown; accepted values: {', '.join(VARIANTS)}")
  mean, cov = ns.joint_gaussian(pairs.eps_q, pairs.delta, per_channel=per_channel, outlier_std=outlier_std)
  beta, intercept, var_cond = ns.conditional_gaussian(mean, cov, rho_max=rho_max)
  c2 = pairs.coef ** 2
  c2 = c2[:, None] if var_cond.ndim == 2 else c2
  sign = -1.0 if variant == "deterministic" else 1.0
  corr = affine_correction("d2_dpm", pairs.ts, scale=1.0 - beta, shift=-intercept, var=sign * c2 * var_cond)
  report = {"beta": np.asarray(beta).tolist(), "sigma_cond": np.sqrt(np.asarray(var_cond)).tolist()}
  return corr, report


def correction_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    pairs = ns.collect(qm, stats_samples(config), seed=stats_seed(config, qm))
    corr, report = d2_correction(pairs, variant=get("variant", "deterministic"),
                                 per_channel=bool(get("per_channel", True)),
                                 outlier_std=float(get("outlier_std", 4.0)), rho_max=float(get("rho_max", 0.9999)))
    return attach(qm, corr, d2_dpm=report)

  return run


@register("d2_dpm", family="unet_ptq/error_correction", model_families=("unet", "unet_text"),
          paper="D2-DPM (arXiv 2501.08180)")
def d2_dpm(config=None) -> Recipe:
  variant = common.config_get(config, "variant", "deterministic")
  if variant not in VARIANTS:
    raise ValueError(f"D2-DPM config field variant={variant!r} is unknown; accepted values: {', '.join(VARIANTS)}")
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, keep_fp=PTQD_KEEP_FP,
                     eight_bit=PTQD_EIGHT_BIT, quantize_matmuls=False)
  return Recipe("d2_dpm", "unet_ptq/error_correction", rules, chain(*base_passes(config), correction_pass(config)),
                "per-step (channel-wise) joint Gaussian of (ε_q, Δ); conditional mean removed, conditional "
                "variance absorbed (D-D²) or re-injected (S-D²) by the sampler")
