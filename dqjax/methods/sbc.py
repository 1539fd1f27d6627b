"""SBC: Softmax Bias Correction for Quantized Generative Models (Pandey et al., Qualcomm, ICCV-W 2023;
arXiv 2309.01729; no public code).

Quantizing softmax probabilities to 8 bits (or fewer) rounds the many small probabilities to zero, so a
quantized attention row sums to less than one: a systematic bias that Q-Diffusion avoids by keeping the
softmax at 16 bits. SBC estimates the bias offline and adds it back:

    b = E[p − Q(p)]        (per layer, per head and per sampler step here),   p̂ = Q(p) + b

Since Σ_k p_k = 1 this is also the mean row-sum deficit (1 − E[Σ_k Q(p)_k]) / L spread over the L keys. In
deployment b folds into the quantizer's offset (the dequantization (q − z)·s + b), so it costs nothing.

Implemented: the core's MSE-searched PTQ with the attention matmuls quantized (softmax probabilities on an
unsigned grid at the activation bits), then one compiled pass over the calibration steps with the quantized
model that accumulates Σ(p − Q(p)) per head for every softmax·V op, giving a per-step table (or one value per
layer with `per_step=False`); the offsets live in `OpState.extra['offset']` of the `sv_matmul` ops and are
added by the extended forward (`_act_extra.ExtQModel`).

Deviations: the paper's granularity (per layer vs per head) and its calibration details are not public; we
keep per-head, per-step tables (the paper's SD numbers use one offset per layer: `per_head=False,
per_step=False`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._act_extra import StepTable, as_ext, observe_steps, set_extra
from dqjax.methods._correction import base_passes, base_rules
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant import tables
from dqjax.transform import apply as qapply

SOFTMAX_OP = r".*sv_matmul"


def softmax_bias(p: jax.Array, q: jax.Array, head_axis: int = 1):
  """(Σ (p − q) per head, element count per head) of probabilities p and their quantized values q."""
  axes = tuple(i for i in range(p.ndim) if i != head_axis)
  n = p.size // p.shape[head_axis]
  return jnp.sum(p - q, axis=axes), jnp.full((p.shape[head_axis],), float(n), jnp.float32)


def bias_tables(qm, data: CalibData, *, pattern: str = SOFTMAX_OP, per_head: bool = True) -> dict[str, jax.Array]:
  """{sv_matmul path: bias [S, heads]} measured with the quantized model on the calibration steps."""
  targets = [op for op in qm.plan.ops if re.fullmatch(pattern, op.path) and op.act_spec("lhs") is not None
             and not op.act_spec("lhs").dynamic]
  if not targets:
    return {}
  paths = {op.path for op in targets}
  qstate = qm.qstate

  def make(t):
    def stat_fn(op, operand, x):
      if op.path not in paths or operand != "lhs":
        return None
      q = qapply.quantize_operand(x, op, qstate[op.path], "lhs", t)
      return {"sbc": softmax_bias(x, q)}
    return stat_fn

  stats = observe_steps(qm, data, make, lambda a, b: (a[0] + b[0], a[1] + b[1]), quantize=True)
  out = {}
  for path in paths:
    tot, cnt = stats[path]["sbc"]            # [S, heads]
    if not per_head:
      tot, cnt = jnp.sum(tot, -1, keepdims=True), jnp.sum(cnt, -1, keepdims=True)
    out[path] = tot / cnt
  return out


def sbc_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data: CalibData):
    if qm.meta.get("a_bits", 8) >= 16:
      return as_ext(qm)
    per_step = bool(get("per_step", True))
    biases = bias_tables(qm, data, per_head=bool(get("per_head", True)))
    steps_t = np.asarray(data.ts).astype(int).tolist()
    spec = tables.TableSpec("per_step" if per_step else "static")
    index = jnp.asarray(tables.timestep_index(spec, steps_t, qm.num_train_timesteps)) if per_step and len(steps_t) > 1 else None
    report = {}
    qm = as_ext(qm)
    for path, b in sorted(biases.items()):
      value = b if per_step else jnp.mean(b, 0, keepdims=True)
      qm = set_extra(qm, path, "offset", "lhs", StepTable(value, index if value.shape[0] > 1 else None))
      report[path] = float(jnp.mean(b))
    return qm.replace(meta={**qm.meta, "sbc_mean_bias": report})

  return run


@register("sbc", family="unet_ptq/error_correction", model_families=("unet", "unet_text"),
          paper="SBC (arXiv 2309.01729)")
def sbc(config=None) -> Recipe:
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True)
  return Recipe("sbc", "unet_ptq/error_correction", rules, chain(*base_passes(config), sbc_pass(config)),
                "offline softmax bias correction: E[p − Q(p)] per head and step added to the quantized "
                "attention probabilities (folds into the quantizer offset)")
