"""Q-Diffusion: Quantizing Diffusion Models (Li et al., ICCV 2023; arXiv 2302.04304; Xiuyu-Li/q-diffusion).

Implemented, following the public code (qdiff/, scripts/sample_diffusion_*.py):
- timestep-aware calibration: `calib_steps` steps evenly spaced over the whole FP trajectory with
  `calib_n` samples each (the trajectory is regenerated with the model's own sampler when the recipe has a
  DiffusionEnv; otherwise the given data is treated as the trajectory and re-selected uniformly);
- shortcut splitting: every ResBlock 1×1 `conv_shortcut` whose input is a skip concatenation gets two
  activation quantizers and two per-output-channel weight quantizers (with their own AdaRound halves), the
  split point read from the model (the `skip_concat` op's first operand); the ResBlock's conv1 sees
  GroupNorm+SiLU of the concat and is not split, as in the paper;
- weights: per-output-channel asymmetric, initialised by an Lp grid search ('mse', the LDM setting; 'minmax'
  is the DDIM 'max' setting), then BRECQ block reconstruction with AdaRound (blocks: ResBlocks, attention
  blocks, the time-embedding MLP; every other layer alone), inputs from the quantized-so-far model;
- activations: per-tensor (asymmetric unless `act_symmetric`), quantized at each layer's input, initialised
  by the Lp(2.4) search over all calibration data, then their step sizes learned by block reconstruction
  (Lp 2.4 loss, Adam with cosine decay, lr 4e-4);
- attention: q and k (operands of QKᵀ), v and the softmax probabilities (operands of softmax·V; probabilities
  on an unsigned grid at `softmax_bits`). Nothing is kept in float (time embedding, conv_in and conv_out
  are quantized and reconstructed too).

Deliberate deviations: iterations per block default to CPU sizes (`iters_w`, `iters_a` in the config; the
paper's 20000 / 5000 are in `paper_iters_w` / `paper_iters_a`) with a larger AdaRound learning rate to make up
for it; activation ranges are initialised on the float-weight model (the code runs that forward with weights
already quantized); all calibration samples are used for the activation init (the LDM script used only the
first 64, i.e. a single timestep — a bug the notes flag); the softmax keeps 8 bits by default where the SD
script keeps 16 (the core's quantizers are ≤ 8 bits: set `softmax_bits` lower if wanted). The split
quantizers get soft rounding and the regulariser like every other weight (the code forgets both for the
second half).
"""
from __future__ import annotations

import re

from dqjax.calib import reconstruct as rc
from dqjax.calib.calib_sets import trajectory_for
from dqjax.calib.data import select
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config, split_shortcuts_pass, with_data
from dqjax.methods.recipe import Recipe, register

WEIGHT_RECON = rc.ReconConfig(iters=100, batch_size=16, lr_w=1e-2, round_weight=0.01, p=2.0, asym=True,
                              num_samples=256)
ACT_RECON = rc.ReconConfig(iters=50, batch_size=16, lr_a=4e-4, schedule_a="cosine", p=2.4, asym=True,
                           num_samples=256)


def uniform_steps(config):
  """The calibration set: `calib_steps` evenly spaced steps of the FP trajectory, `calib_n` samples each."""
  steps = common.config_get(config, "calib_steps", 10)
  n = common.config_get(config, "calib_n", 32)

  def make(qm, data):
    traj = trajectory_for(qm, data, n)
    return select(traj, "uniform", min(int(steps), traj.num_steps))

  return make


def recon_blocks(config, exclude=()):
  """blocks(qm): the U-Net partition, restricted to block paths matching the config's `recon_only` regex."""
  only = common.config_get(config, "recon_only", None)

  def blocks(qm):
    out = rc.partition(qm.plan, exclude=exclude)
    return out if not only else [b for b in out if re.fullmatch(only, b.path)]

  return blocks


def passes(config):
  """The Q-Diffusion pass chain (used by other recipes that build on it)."""
  get = lambda k, d: common.config_get(config, k, d)
  w_cfg = rc.config_from(config, "recon_w_", WEIGHT_RECON).replace(iters=get("iters_w", WEIGHT_RECON.iters))
  a_cfg = rc.config_from(config, "recon_a_", ACT_RECON).replace(iters=get("iters_a", ACT_RECON.iters))
  blocks = recon_blocks(config)
  steps = [split_shortcuts_pass(bool(get("split_shortcut", True))),
           common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0),
           rc.reconstruction_pass(w_cfg, phase="weights", blocks=blocks)]
  act_steps = [common.calibrate_activations_pass(get("act_init", "mse"), p=2.4,
                                                 batch_size=get("calib_batch", None)),
               rc.reconstruction_pass(a_cfg, phase="acts", blocks=blocks)] if get("learn_act_steps", True) else [
                   common.calibrate_activations_pass(get("act_init", "mse"), p=2.4,
                                                     batch_size=get("calib_batch", None))]

  def run(qm, data):
    for p in steps:
      qm = p(qm, data)
    if qm.meta.get("a_bits", 8) < 16:
      for p in act_steps:
        qm = p(qm, data)
    return qm

  return run


@register("q_diffusion", family="unet_ptq/bimodal", model_families=("unet", "unet_text"),
          paper="Q-Diffusion (arXiv 2302.04304)")
def q_diffusion(config=None) -> Recipe:
  rules = rules_from_config(config, weight_symmetric=False, act_symmetric=False, quantize_matmuls=True)
  return Recipe("q_diffusion", "unet_ptq/bimodal", rules, with_data(uniform_steps(config), passes(config)),
                "timestep-aware uniform calibration, split shortcuts, BRECQ+AdaRound weights, learned "
                "activation steps, q/k/v/softmax quantizers")
