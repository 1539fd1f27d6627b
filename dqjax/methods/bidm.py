"""BiDM (Zheng et al., NeurIPS 2024; arXiv 2412.05926; code Xingyu-Zheng/BiDM): fully binarized (W1A1)
diffusion models with a timestep-friendly binary structure and space-patched distillation.

Implemented (code: `util_ours.py`, `ddpm_ours.py`):
- weights: sign(W)·mean|W| per output channel, the scale recomputed at every forward and detached, STE through
  clip(W, −1, 1);
- activations (the learnable part of the timestep-friendly binary structure): sign(x + τ) with a learnable
  per-input-channel threshold τ (0 at start) and the ApproxSign backward; convolution outputs rescaled by the
  XNOR map K = avgpool_k(mean_c |x|) of the layer's own window/stride/padding; a learnable scaled shortcut
  y + |γ|·shortcut(x) (γ = 0.3; identity, average pooling for strided convolutions, a 1×1 convolution when the
  channels change);
- float: the time-embedding MLP, the first and the last convolution; attention matmuls stay float;
- Space Patched Distillation (SPD): every U-Net block output is cut into 4×4 spatial patches; per patch and
  channel the spatial Gram matrix, normalised by the patch's Frobenius norm, is matched to the FP teacher's
  (L2); loss = ε-prediction loss + 1e-2·SPD;
- latent float weights, τ, γ and the shortcut kernels train with Adam.

Not implemented (open): the *cross-timestep feature connection* of the timestep-friendly structure, which mixes
each decoder block's output with the same block's output cached at the previous denoising step through a
learnable [100 × blocks] table. It needs a sampler that carries features from one model call to the next;
dqjax's samplers call a stateless `denoise(x, t, cond)` (see docs/methods/qat.md).

Deviations (paper values in `configs/methods/bidm.py`): data-free (x₀ from the FP model's own samples; paper:
the LSUN/FFHQ training sets, ~200k iterations), CPU-sized training with a larger learning rate, the patch
grid shrinks to the feature size on 4×4 maps, the zero-initialised 1×1 shortcut kernels, the binary layers
keep their float bias (the code drops it), and the loss adds the ε-MSE to the FP teacher (`output_weight`).
"""
from __future__ import annotations

import jax.numpy as jnp

from dqjax.calib import distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.transform import hooks
from dqjax.transform.rules import Rule

NAME = "bidm"
KEEP_FP = f"({_qat.TIME_EMBED})|({_qat.FIRST_LAST_OPS})"


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    if w_bits != 1 or a_bits != 1:
      raise ValueError(f"BiDM is fully binary: bit setting W{w_bits}A{a_bits} is not accepted; use 'W1A1'")
    return [Rule(_qat.get(config, "keep_fp", KEEP_FP), keep_fp=True),
            Rule(".*", keep_fp=True, kinds=("matmul",)),
            Rule(".*", weight=_qat.weight_spec(1), act=_qat.act_spec(1))]
  return rules


def binarize(qm, *, shortcut_gamma=0.3):
  """XNOR weights, learnable-threshold binary activations with the K map, and shortcuts on every binary op."""
  paths = [op.path for op in qm.plan.ops if op.weight is not None]
  for path in paths:
    op = qm.plan[path]
    qm = _qat.add_extra(qm, path, "xnor", {})
    qm = _qat.add_extra(qm, path, "bin_act", {"tau": jnp.zeros((op.info.input_shapes[0][-1],), jnp.float32)})
  if shortcut_gamma is not None:
    qm = _qat.add_shortcuts(qm, paths, shortcut_gamma)
  return hooks.as_qat_model(qm)


def passes(config):
  def run(qm, data):
    cfg = _qat.distill_config(config, steps=300, batch_size=8, pool_size=64, order="forward",
                              diffusion_weight=1.0, feature_weight=1e-2, feature_loss="spd", spd_grid=4,
                              feature_patterns=distill.UNET_BLOCK_OUTPUTS, output_weight=1.0, guided=False)
    pool, _ = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = binarize(qm, shortcut_gamma=_qat.get(config, "shortcut_gamma", 0.3))
    quantized = {op.path for op in qm.plan.ops if op.quantized}
    latent = distill.any_of(distill.kernels(), distill.biases())
    groups = [distill.Group("weights", float(_qat.get(config, "lr_weights", 1e-4)),
                            lambda l: latent(l) and l.module in quantized),
              distill.Group("binarizer", float(_qat.get(config, "lr_binarizer", 1e-3)),
                            distill.any_of(distill.extra("bin_act"), distill.extra("shortcut")))]
    return distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
  return run


@register(NAME, family="unet_qat/ultra_low_bit", model_families=("unet", "unet_text"),
          paper="BiDM (arXiv 2412.05926)", settings=("W1A1",))
def bidm(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/ultra_low_bit", rules_fn(config), passes(config),
                "W1A1: XNOR weights, learnable-threshold binary activations with K maps, space-patched distillation")
