"""IntLoRA (Guo et al., 2024; arXiv 2410.21759; code csguoh/IntLoRA): integer low-rank adaptation whose merge
keeps the weights on an integer grid.

Implemented (code: `utils/intlora_mul.py`, `intlora_shift.py`, `quant_model.py`):
- attention projections (to_q, to_k, to_v, to_out) become IntLoRA layers; every other conv/linear gets a
  per-output-channel asymmetric MSE-searched weight quantizer (p = 2.4) and no adapter;
- adaptation-quantization separation (AQS): an auxiliary R ~ Laplace(0, 0.5) with variance-matching control
  (each output channel rescaled by absmax(W_c)^α / min(|max R_c|, |min R_c|)^α, α = 1.5); W − R is quantized
  per channel (asymmetric, MSE) to W_int, s, z and the float weight is no longer used;
- multiplicative LoRA (MLA): s' = s + (R + B·A) ⊘ (W_int − z) (1 where the centred code is 0); IntLoRA-MUL
  quantizes s' per output channel at the weight's bit width (MSE-initialised, then frozen, as the code's
  double-quant Δ/z are never trained) and the merged weight Δ₂·(q(s') ⊙ (W_int − z)) is an integer product on
  the grid Δ₂·ℤ; IntLoRA-SHIFT rounds s' to signed powers of two (a bit shift) instead;
- only A and B train (A kaiming-uniform, B = 0), Adam; activations optionally per-tensor MSE quantized.

Deviations (paper values in `configs/methods/intlora.py`): the paper adapts SD-1.5 to DreamBooth subjects with
the noise-prediction loss (2000 steps, lr 6e-5, rank 4); here the adaptation target is the FP model itself
(ε-MSE to the FP teacher along teacher-forced trajectories), CPU-sized (a few hundred steps, larger lr).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from dqjax.calib import calibrate, distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import lowbit
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from dqjax.transform.rules import Rule

NAME = "intlora"
VARIANTS = ("mul", "shift")


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    a = _qat.act_spec(a_bits) if _qat.get(config, "act_quant", True) else None
    return [Rule(".*", keep_fp=True, kinds=("matmul",)),
            Rule(".*", weight=_qat.weight_spec(w_bits, symmetric=False), act=a)]
  return rules


def add_intlora(qm, paths, *, rank: int, key, variant: str = "mul", alpha: float = 1.5,
                laplace_scale: float = 0.5, candidates: int = 80):
  """Replace the weight quantizers of `paths` by IntLoRA layers (R, W_int − z, s, A, B and, for 'mul', the
  frozen per-channel quantizer of s')."""
  if variant not in VARIANTS:
    raise ValueError(f"IntLoRA variant={variant!r} is unknown; accepted values: {', '.join(VARIANTS)}")
  qstate = dict(qm.qstate)
  wq = jax.jit(calibrate.weight_qparams, static_argnames=("spec", "method", "num_candidates", "p", "percentile"))
  for i, path in enumerate(paths):
    op = qm.plan[path]
    if op.weight is None or op.weight.format != "int":
      raise ValueError(f"IntLoRA needs an int weight quantizer on {path!r}")
    st = qstate[path]
    w = qapply.effective_kernel(qapply.get_kernel(qm.params, path), st)
    k_r, k_a = jax.random.split(jax.random.fold_in(key, i))
    r = lowbit.intlora_aux(k_r, w, alpha=alpha, laplace_scale=laplace_scale)
    qp = wq(w - r, spec=op.weight, method="mse", num_candidates=candidates, p=2.4)
    codes = lowbit.centred_codes(w - r, qp, op.weight)
    fan_in = math.prod(w.shape[:-1])
    rk = min(rank, w.shape[-1], fan_in)
    bound = 1.0 / math.sqrt(fan_in)       # kaiming_uniform(a=√5) on A
    a = jax.random.uniform(k_a, (fan_in, rk), jnp.float32, -bound, bound)
    b = jnp.zeros((rk, w.shape[-1]), jnp.float32)
    ex = {"codes": codes, "s": qp.scale, "r": r, "a": a, "b": b}
    if variant == "mul":
      s0 = lowbit.intlora_scale(codes, qp.scale, r, jnp.zeros_like(r))
      qs = wq(s0, spec=hooks.intlora_scale_spec(op.weight), method="mse", num_candidates=candidates, p=2.4)
      ex["qs_scale"], ex["qs_zero"] = qs.scale, qs.zero_point
    extra = dict(st.extra)
    extra["intlora"] = ex
    qstate[path] = st.replace(weight=qp, extra=extra)
  return hooks.as_qat_model(qm.replace(qstate=qstate))


def merged_codes(qm, path: str):
  """(integer codes, per-channel step) of an IntLoRA-MUL op's merged weight: W' = step · codes."""
  ex = qm.qstate[path].extra["intlora"]
  op = qm.plan[path]
  delta = (ex["a"] @ ex["b"]).reshape(ex["codes"].shape)
  s_prime = lowbit.intlora_scale(ex["codes"], ex["s"], ex["r"], delta)
  spec = hooks.intlora_scale_spec(op.weight)
  qs = jnp.clip(jnp.round(s_prime / ex["qs_scale"]) + jnp.round(ex["qs_zero"]), spec.qmin, spec.qmax) - \
      jnp.round(ex["qs_zero"])
  return qs * ex["codes"], ex["qs_scale"]


def passes(config):
  def run(qm, data):
    cfg = _qat.distill_config(config, steps=200, batch_size=8, pool_size=64, order="trajectory")
    pool, cdata = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = calibrate.calibrate_weights(qm, "mse", p=2.4, num_candidates=80)
    qm = _qat.calibrate_acts(qm, cdata, "mse", tables.TableSpec(), p=2.4)
    rx = re.compile(_qat.get(config, "lora_pattern", _qat.ATTN_PROJ))
    paths = [op.path for op in qm.plan.ops if op.weight is not None and rx.fullmatch(op.path)]
    qm = add_intlora(qm, paths, rank=int(_qat.get(config, "rank", 4)), key=jax.random.key(cfg.seed),
                     variant=_qat.get(config, "variant", "mul"), alpha=float(_qat.get(config, "vmc_alpha", 1.5)))
    groups = [distill.Group("lora", float(_qat.get(config, "lr", 1e-3)), distill.extra("intlora", fields=["a", "b"]))]
    return distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
  return run


@register(NAME, family="unet_qat/lora", model_families=("unet", "unet_text", "dit"),
          paper="IntLoRA (arXiv 2410.21759)")
def intlora(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/lora", rules_fn(config), passes(config),
                "integer LoRA (AQS + VMC + multiplicative merge on the integer grid) on attention projections")
