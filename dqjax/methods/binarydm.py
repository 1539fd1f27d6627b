"""BinaryDM (Zheng et al., 2024; arXiv 2404.05662; code Xingyu-Zheng/BinaryDM): 1-bit weights with an evolvable
(learnable) multi-basis binarizer and low-rank representation mimicking; W1A4 / W1A8 / W1A32.

Implemented (code: `ours_util.py`, `openaimodel_ours.py`, `ddpm_ours.py`):
- Learnable Multi-basis Binarizer (LMB): Ŵ = α1·sign(W) + α2·sign(W − α1·sign(W)) with learnable per-channel
  α1, α2 (initialised at mean|W| and mean|residual|) for the full-resolution level(s) (the code: order 2 in
  levels 0–1 of 4, i.e. the upper half; here ⌈levels/2⌉), one basis elsewhere, whose α the code
  re-initialises at every forward (so: sign(W)·mean|W| recomputed, detached); sign with BinaryDM's STE
  (zero gradient where |W| > 1); about 1.1 bits on average (order-2 layers are costed at 2 bits);
- the binary convolutions' learnable scaled shortcut y + |γ|·shortcut(x) (γ = 0.3, identity / average pooling,
  a 1×1 convolution when channels change) of `BNNConv2d`;
- activations: per-tensor symmetric LSQ quantizers (4 bits for W1A4) on every binary layer and on the
  attention matmul operands;
- float: the time-embedding MLP, the first convolution and the last one, and the ResBlock time-embedding
  projections (the code's non-level 'emb' modules);
- Low-rank Representation Mimicking (LRM): the outputs of every U-Net block (LDM's TimestepEmbedSequential
  units) are projected on the top-C/4 principal directions of the FP teacher's features (computed once on
  the first batch, then cached) and matched by MSE; loss = ε-prediction loss + 1e-4·LRM;
- progressive binarization: at training start the middle block is binarized first and one resolution level
  further out per step (the code switches one group per batch over the first batches);
- latent float weights, α's, activation steps and shortcuts train with Adam.

Deviations (paper values in `configs/methods/binarydm.py`): data-free (x₀ from the FP model's own samples;
paper: the LSUN training set), CPU-sized training (a few hundred steps instead of a full QAT schedule, with a
larger learning rate), principal directions over channels (the code's features are NCHW reshaped on their
last, spatial axis), activation steps initialised by an MSE search and then learned (the code's `_ActQ`
re-initialises α = 2·mean|x|/√Qp at every forward, i.e. a dynamic per-tensor scale), the attention matmul
quantizers are on from the first step (the code switches them on after 5 batches), the zero-initialised 1×1
shortcut kernels (the code: PyTorch's default initialisation), and the loss adds the ε-MSE to the FP teacher
(`output_weight`, 0 keeps the paper's loss).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from dqjax.calib import distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import lowbit
from dqjax.quant import tables
from dqjax.quant.spec import QuantSpec
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from dqjax.transform.rules import Rule

NAME = "binarydm"
KEEP_FP = f"({_qat.TIME_EMBED})|({_qat.FIRST_LAST_OPS})|({_qat.EMB_PROJ})"


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    if w_bits != 1:
      raise ValueError(f"BinaryDM binarizes weights: weight bits={w_bits} is not accepted; use a W1A<bits> "
                       "setting (e.g. 'W1A4')")
    a = _qat.act_spec(a_bits, symmetric=True)
    return [Rule(_qat.get(config, "keep_fp", KEEP_FP), keep_fp=True),
            Rule(".*", act=a, kinds=("matmul",)),
            Rule(".*", weight=_qat.weight_spec(1), act=a)]
  return rules


def binarize(qm, *, order2_levels=None, shortcut_gamma=0.3, progressive=True):
  """Attach LMB (order 2 on the upper levels, dynamic order 1 elsewhere), shortcuts and progressive gates."""
  levels = _qat.num_levels(qm.plan)
  n2 = math.ceil(levels / 2) if order2_levels is None else int(order2_levels)
  paths = [op.path for op in qm.plan.ops if op.weight is not None]
  plan = qm.plan
  for path in paths:
    lvl = _qat.unet_level(path, levels)
    w = qapply.effective_kernel(qapply.get_kernel(qm.params, path), qm.qstate[path])
    if lvl is not None and lvl < n2:
      a1, a2 = lowbit.lmb_init(w, 2)
      qm = _qat.add_extra(qm, path, "lmb", {"alpha1": a1, "alpha2": a2})
      plan = plan.with_specs(path, weight=QuantSpec("int", 2, symmetric=True, granularity="channel", axis=-1))
    else:
      qm = _qat.add_extra(qm, path, "xnor", {})
    if progressive:
      # middle block first, then one level further out per training step; ops outside the levels at once
      start = 0 if lvl is None else levels - 1 - lvl
      qm = _qat.add_extra(qm, path, "gate", {"start": jnp.asarray(start, jnp.int32)})
  qm = qm.replace(plan=plan)
  if shortcut_gamma is not None:
    qm = _qat.add_shortcuts(qm, paths, shortcut_gamma)
  return hooks.as_qat_model(qm)


def passes(config):
  def run(qm, data):
    cfg = _qat.distill_config(config, steps=300, batch_size=8, pool_size=64, order="forward",
                              diffusion_weight=1.0, feature_weight=1e-4, feature_loss="lowrank",
                              feature_patterns=distill.UNET_BLOCK_OUTPUTS, output_weight=1.0, guided=False)
    pool, cdata = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = _qat.calibrate_acts(qm, cdata, _qat.get(config, "act_init", "mse"), tables.TableSpec(), p=2.4)
    qm = binarize(qm, order2_levels=_qat.get(config, "order2_levels", None),
                  shortcut_gamma=_qat.get(config, "shortcut_gamma", 0.3),
                  progressive=_qat.get(config, "progressive", True))
    quantized = {op.path for op in qm.plan.ops if op.quantized}
    latent = distill.any_of(distill.kernels(), distill.biases())
    groups = [distill.Group("weights", float(_qat.get(config, "lr_weights", 1e-4)),
                            lambda l: latent(l) and l.module in quantized),
              distill.Group("binarizer", float(_qat.get(config, "lr_scales", 1e-3)),
                            distill.any_of(distill.extra("lmb"), distill.extra("shortcut"), distill.act_params()))]
    return distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
  return run


@register(NAME, family="unet_qat/ultra_low_bit", model_families=("unet", "unet_text"),
          paper="BinaryDM (arXiv 2404.05662)", settings=("W1A8", "W1A4"))
def binarydm(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/ultra_low_bit", rules_fn(config), passes(config),
                "learnable multi-basis binarizer + low-rank representation mimicking, progressive binarization")
