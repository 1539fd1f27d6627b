"""EfficientDM (He et al., ICLR 2024; arXiv 2310.03270; code ThisisBillhe/EfficientDM).

Implemented:
- layer selection of the code: every conv/linear is quantized except residual 1×1 shortcut convolutions
  ('skip') and strided down-sampling convolutions ('op'), which stay float; attention matmuls stay float; the
  time-embedding MLP and the first/last convolutions are 8-bit plain quantizers without LoRA;
- naive PTQ initialisation: per-output-channel asymmetric min-max weights; per-tensor asymmetric activations by
  an Lp(2.4) shrink search, one (Δ_t, z_t) per sampler step (TALSQ, a `per_step` timestep table);
- quantization-aware LoRA (QALoRA): W' = W + B·A merged *before* weight quantization with the learnable
  per-channel Δ_w (core `add_lora`, B = 0 at start, so the model starts at the PTQ solution);
- data-free distillation from the FP model: FP sampling trajectories of the model's own sampler (CFG as
  configured), teacher forcing (both models see the FP x_t), one AdamW update per sampler step, loss =
  Σ(ε_Q − ε_FP)² on CFG-combined ε (sum, as the code), three learning-rate groups (LoRA at mean(Δ_w)/divisor
  per layer, weight Δ, activation Δ_t and z_t) with a linear decay to 0;
- deployment: LoRA merged into the kernels afterwards (`merge_lora`), so the result is a plain quantized model
  whose weights are re-quantized with the learned Δ_w (the forward is unchanged by the merge).

Deliberate deviations (paper values kept in `configs/methods/efficientdm.py`):
- CPU-sized training: a few hundred updates over a pool of 64 trajectories (paper: 160 epochs × 100 DDIM
  steps = 16,000 updates, fresh trajectories each epoch), LoRA rank 4 (paper 32: our layers have 32–128
  channels) and a larger LoRA learning rate (mean(Δ_w)/250 instead of /2500) so that the few updates matter;
- training trajectories use the evaluation sampler and guidance (paper: DDIM 100, η = 1, scale 1.5 for
  training, scale 3.0 for evaluation);
- activation tables are initialised per step from the FP trajectories (the code initialises one static range
  and copies it to every step).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from dqjax.calib import calibrate, distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import tables
from dqjax.transform import param_transforms as pt
from dqjax.transform.rules import Rule

NAME = "efficientdm"


def _plain8(config) -> str:
  return _qat.get(config, "plain_pattern", f"({_qat.TIME_EMBED})|({_qat.FIRST_LAST_OPS})")


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    fl = int(_qat.get(config, "first_last_bits", 8))
    return [Rule(_qat.SKIP_CONV, keep_fp=True), Rule(_qat.DOWNSAMPLE, keep_fp=True),
            Rule(".*", keep_fp=True, kinds=("matmul",)),
            Rule(_plain8(config), weight=_qat.weight_spec(fl, symmetric=False), act=_qat.act_spec(fl)),
            Rule(".*", weight=_qat.weight_spec(w_bits, symmetric=False), act=_qat.act_spec(a_bits))]
  return rules


def lora_paths(qm, config) -> list[str]:
  plain = re.compile(_plain8(config))
  return [op.path for op in qm.plan.ops if op.weight is not None and not plain.fullmatch(op.path)
          and op.info.kind in ("dense", "conv")]


def lora_lr_scale(qm, divisor: float):
  """EfficientDM's per-layer LoRA learning rate: mean(Δ_w of the layer) / divisor."""
  means = {p: float(jnp.mean(st.weight.scale)) for p, st in qm.qstate.items() if st.weight is not None}
  return lambda info, value: means[info.module] / divisor


def passes(config):
  def run(qm, data):
    cfg = _qat.distill_config(config, steps=200, batch_size=8, pool_size=64, order="trajectory",
                              reduction="sum", optimizer="adamw", weight_decay=0.01, schedule="linear")
    pool, cdata = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = calibrate.calibrate_weights(qm, _qat.get(config, "weight_init", "minmax"))
    qm = _qat.calibrate_acts(qm, cdata, _qat.get(config, "act_init", "mse"), tables.TableSpec("per_step"),
                             batch_size=_qat.get(config, "calib_batch", None), p=2.4,
                             num_candidates=_qat.get(config, "act_candidates", 80))
    key = jax.random.key(cfg.seed)
    rank = int(_qat.get(config, "lora_rank", 4))
    for i, path in enumerate(lora_paths(qm, config)):
      fan_in = 1
      for d in qm.plan[path].info.weight_shape[:-1]:
        fan_in *= d
      # kaiming_uniform(a=√5) on A gives U(−1/√fan_in, 1/√fan_in): the same standard deviation, as a Gaussian
      qm = pt.add_lora(qm, path, min(rank, qm.plan[path].info.weight_shape[-1]), jax.random.fold_in(key, i),
                       init_scale=1.0 / (3.0 * fan_in) ** 0.5)
    groups = [distill.Group("lora", 1.0, distill.lora(),
                            lr_scale=lora_lr_scale(qm, float(_qat.get(config, "lora_lr_divisor", 250.0)))),
              distill.Group("weight_scale", float(_qat.get(config, "lr_weight_scale", 1e-6)), distill.weight_scales()),
              distill.Group("act", float(_qat.get(config, "lr_act", 5e-4)), distill.act_params())]
    qm = distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
    if _qat.get(config, "merge_lora", True):
      qm = pt.merge_lora(qm)
    return qm
  return run


@register(NAME, family="unet_qat/lora", model_families=("unet", "unet_text", "dit"),
          paper="EfficientDM (arXiv 2310.03270)")
def efficientdm(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/lora", rules_fn(config), passes(config),
                "QALoRA merged before weight quantization + per-step activation LSQ, data-free distillation")
