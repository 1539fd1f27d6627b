"""TaC-QDM / TAC-Diffusion: Timestep-Aware Correction for Quantized Diffusion Models (Yao et al., ECCV 2024;
arXiv 2407.03917; no public code).

The paper attributes error accumulation to error propagation (each step's quantized ε error) and to exposure
bias (the quantized trajectory's inputs drift from the FP ones) and corrects both per timestep, without
training:
- NER (noise estimation reconstruction): per step a channel-wise coefficient K_t rescales the quantized ε;
  it minimises a masked reconstruction loss Σ_mask (K ε_q − ε_fp)², a convex problem with the closed form
  K = Σ ε_q ε_fp / Σ ε_q², where the mask keeps the elements with the largest relative distortion
  |ε_q − ε_fp| / |ε_fp| (the paper's rQNSR weighting: large-error regions dominate);
- IBC (input bias correction): per step the mean offset (per channel) of the quantized trajectory's input
  x̂_t from the FP input x_t, measured offline on paired runs from identical noise, is removed from x̂_t.
  The state x̂_t is produced by the previous call's update, in which ε enters with the coefficient c_{t−1}
  (`noise_stats.eps_coefficients`), so subtracting b_t from x̂_t is exactly the ε shift −b_t / c_{t−1} at the
  previous call: the whole method is one per-step affine ε correction. Biases are estimated sequentially
  (the bias of step t is measured with the corrections of the earlier steps in place), one compiled
  sampler run per step.
- base quantizer: the core's MSE-searched PTQ with attention matmuls quantized (the paper applies TaC on top of
  PTQ baselines such as Q-Diffusion/PTQD).

Deviations (no code is public, so the details are our reading of the paper [paper summary]): the mask is the
top `mask_keep` fraction of elements by relative distortion; the input bias is per channel; the statistics use
`stats_samples` fresh FP trajectories; `ibc_sequential=False` estimates every bias from one run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import noise_stats as ns
from dqjax.methods import common
from dqjax.methods._correction import _affine_fn, affine_correction, attach, base_passes, base_rules, stats_samples, stats_seed
from dqjax.methods.recipe import Recipe, chain, register


def corrected_sampler(qm, denoise_q):
  """Jitted `(x_T, conds, key, scale [S, C], shift [S, C]) -> SampleOutput`: the quantized sampler with an
  affine ε correction whose tables are arguments (one compilation for every table)."""
  env = ns._require_env(qm)
  from dqjax.diffusion import samplers
  cfg = ns._plain_sampler(env.sampler)
  ts = jnp.asarray(samplers.timesteps_for(env.schedule, cfg), jnp.float32)

  @jax.jit
  def run(x, conds, key, scale, shift):
    state = {"ts": ts, "scale": scale, "shift": shift, "var": jnp.zeros(ts.shape, jnp.float32)}
    hook = lambda eps, info: _affine_fn(state, eps, info)
    return samplers.sample(ns.guided(qm, denoise_q, conds), env.schedule, cfg, x, key, conds, correction=hook,
                           return_trajectory=True)

  return run


def input_bias_shifts(qm, pairs: ns.EpsPairs, scale, *, num_samples: int, seed: int, sequential: bool = True,
                      denoise_q=None):
  """[S, C]: the ε shifts that remove the quantized trajectory's per-channel input bias, and the biases."""
  x, conds, key = ns.initial_state(qm, num_samples, seed)
  run = corrected_sampler(qm, denoise_q or qm.denoiser())
  s, c = pairs.num_steps, pairs.xs.shape[-1]
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(s, -1), (s, c))
  shift = jnp.zeros((s, c), jnp.float32)
  coef = jnp.asarray(pairs.coef)
  safe = jnp.where(jnp.abs(coef) > 1e-6, coef, jnp.inf)           # a no-op update (c = 0) cannot carry a shift
  biases = jnp.zeros((s, c), jnp.float32)
  if sequential:
    for i in range(1, s):
      xs_q = run(x, conds, key, scale, shift).trajectory.xs
      b = jnp.mean(xs_q[i] - pairs.xs[i], axis=tuple(range(xs_q[i].ndim - 1)))
      biases = biases.at[i].set(b)
      shift = shift.at[i - 1].set(-b / safe[i - 1])
  else:
    xs_q = run(x, conds, key, scale, shift).trajectory.xs
    biases = ns.channel_mean(xs_q - pairs.xs)
    shift = shift.at[:-1].set(-biases[1:] / safe[:-1, None])
  return shift, biases


def correction_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    n, seed = stats_samples(config), stats_seed(config, qm)
    pairs = ns.collect(qm, n, seed=seed)
    scale = ns.masked_channel_scale(pairs.eps_q, pairs.eps_fp, keep=float(get("mask_keep", 0.5)))
    if not get("ner", True):
      scale = jnp.ones_like(scale)
    shift = jnp.zeros_like(scale)
    biases = shift
    if get("ibc", True):
      shift, biases = input_bias_shifts(qm, pairs, scale, num_samples=n, seed=seed,
                                        sequential=bool(get("ibc_sequential", True)))
    corr = affine_correction("tac_qdm", pairs.ts, scale=scale, shift=shift)
    return attach(qm, corr, tac_qdm={"K_mean": np.asarray(jnp.mean(scale, -1)).tolist(),
                                     "input_bias_abs": np.asarray(jnp.mean(jnp.abs(biases), -1)).tolist()})

  return run


@register("tac_qdm", family="unet_ptq/error_correction", model_families=("unet", "unet_text"),
          paper="TaC-QDM / TAC-Diffusion (arXiv 2407.03917)")
def tac_qdm(config=None) -> Recipe:
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True)
  return Recipe("tac_qdm", "unet_ptq/error_correction", rules, chain(*base_passes(config), correction_pass(config)),
                "per-step channel-wise ε rescaling from a masked relative-error loss (NER) and removal of "
                "the quantized trajectory's input bias (IBC), both as ε corrections in the sampler")
