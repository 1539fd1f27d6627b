"""BitsFusion (Sui et al., NeurIPS 2024; arXiv 2406.04333): weight-only mixed precision at ~2 bits on average,
allocated by layer sensitivity, then distillation fine-tuning. The code was announced but not released, so
the recipe follows the paper's description (abstract and summaries):

- sensitivity analysis: every weight layer is quantized alone at each candidate bit width (1 = binary, 2, 3,
  4: per-channel, MSE-searched steps) and scored by the ε-MSE it causes on FP trajectory inputs;
- parameter-size-aware allocation: minimise Σ_l s_l(b_l) subject to Σ_l n_l·b_l ≤ target·Σ_l n_l (n_l the
  layer's weights) by a Lagrangian sweep: each layer takes argmin_b s_l(b) + λ·n_l·b and λ is bisected to the
  smallest value meeting the budget (the target is the setting's weight bits, e.g. 2 → ≤ 2.0 bits average);
- the time-embedding MLP stays float (the paper pre-computes and caches time embeddings);
- stage I: distillation from the FP teacher on the conditional *and* unconditional outputs (CFG-aware) plus
  block-output features, with timesteps drawn ∝ the quantized model's per-step error (quantization-error-aware
  timestep sampling, mixed with uniform); stage II: the ε-prediction loss; latent float weights and weight
  steps train with Adam.

Deviations: the "balance integer" (an extra level making low-bit grids symmetric) and the alternating
scale optimisation are replaced by asymmetric per-channel grids with MSE-searched steps; data-free
(x₀ from the FP samples for stage II); CPU-sized training. At settings with A < 16 the activations get
per-tensor MSE quantizers that stay frozen (the paper is weight-only: the bench runs it at 'W2A16' and
'W3A16', where A16 means float activations).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate, distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform.rules import Rule

NAME = "bitsfusion"


def candidate_spec(bits: int):
  return _qat.weight_spec(bits, symmetric=False)


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    return [Rule(_qat.get(config, "keep_fp", _qat.TIME_EMBED), keep_fp=True),
            Rule(".*", act=_qat.act_spec(a_bits), kinds=("matmul",)),
            Rule(".*", weight=candidate_spec(max(int(_qat.get(config, "candidates", (1, 2, 3, 4))[-1]), 1)),
                 act=_qat.act_spec(a_bits))]
  return rules


def sensitivities(qm, data, candidates, *, num_samples: int = 16) -> dict:
  """{path: [ε-MSE with only that layer at each candidate width]} on a few samples of every step."""
  x, t, c = data.flat()
  n = x.shape[0]
  idx = np.linspace(0, n - 1, min(n, num_samples * data.num_steps)).astype(int)
  x, t = x[idx], t[idx]
  c = None if c is None else c[idx]
  ref = qm.model.apply({"params": qm.fp_params}, x, t, c)
  err = jax.jit(lambda p: jnp.mean((qm.model.apply({"params": p}, x, t, c) - ref) ** 2))
  wq = jax.jit(lambda w, spec: qops.fake_quant(w, calibrate.weight_qparams(w, spec, "mse", num_candidates=50),
                                               spec), static_argnames=("spec",))
  out = {}
  for op in qm.plan.ops:
    if op.weight is None:
      continue
    w = qapply.get_kernel(qm.params, op.path)
    out[op.path] = [float(err(qapply.replace_kernels(qm.params, {op.path: wq(w, candidate_spec(b))})))
                    for b in candidates]
  return out


def allocate(sens: dict, sizes: dict, candidates, target: float) -> dict:
  """Bits per layer minimising total sensitivity under the average-bits budget (Lagrangian bisection)."""
  cands = np.asarray(candidates, np.float64)
  paths = sorted(sens)
  s = np.array([sens[p] for p in paths])                  # [L, K]
  n = np.array([sizes[p] for p in paths], np.float64)     # [L]
  budget = target * n.sum()

  def pick(lam):
    return np.argmin(s + lam * n[:, None] * cands[None, :], axis=1)

  def used(choice):
    return float((n * cands[choice]).sum())

  if used(pick(0.0)) <= budget:
    choice = pick(0.0)
  else:
    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e30:
      hi *= 10.0
    for _ in range(100):
      mid = 0.5 * (lo + hi)
      if used(pick(mid)) > budget:
        lo = mid
      else:
        hi = mid
    choice = pick(hi)
  return {p: int(cands[k]) for p, k in zip(paths, choice)}


def passes(config):
  def run(qm, data):
    target = _qat.get(config, "target_bits", None)        # None: the setting's weight bits
    target = float(qm.meta.get("w_bits", 2) if target is None else target)
    candidates = tuple(int(b) for b in _qat.get(config, "candidates", (1, 2, 3, 4)))
    base = distill.config_from(config, distill.DistillConfig(pool_size=64, batch_size=8), feature_weight=0.0)
    pool, cdata = _qat.trajectories(qm, data, base.pool_size, base.seed)
    sens = sensitivities(qm, cdata, candidates, num_samples=int(_qat.get(config, "sensitivity_samples", 8)))
    sizes = {op.path: op.info.weight_params for op in qm.plan.ops if op.weight is not None}
    bits = allocate(sens, sizes, candidates, target)
    plan = qm.plan
    for path, b in bits.items():
      plan = plan.with_specs(path, weight=candidate_spec(b))
    avg = sum(bits[p] * sizes[p] for p in bits) / max(sum(sizes.values()), 1)
    qm = qm.replace(plan=plan, meta={**qm.meta, "bitsfusion": {"bits": bits, "average_bits": avg}})
    qm = calibrate.calibrate_weights(qm, "mse", p=2.0)
    qm = _qat.calibrate_acts(qm, cdata, "mse", tables.TableSpec(), p=2.4)
    quantized = {op.path for op in qm.plan.ops if op.weight is not None}
    latent = distill.any_of(distill.kernels(), distill.biases())
    groups = [distill.Group("weights", float(_qat.get(config, "lr_weights", 1e-4)),
                            lambda l: latent(l) and l.module in quantized),
              distill.Group("weight_scales", float(_qat.get(config, "lr_scales", 1e-3)), distill.weight_scales())]
    # stage I: CFG-aware output + feature distillation, error-aware timestep sampling
    err = distill.stepwise_error(qm, pool, batch_size=16)
    mix = float(_qat.get(config, "uniform_mix", 0.5))
    w = (1 - mix) * err / max(err.sum(), 1e-12) + mix / len(err)
    c1 = _qat.distill_config(config, pool_size=base.pool_size, batch_size=base.batch_size, order="random",
                             output_weight=1.0, guided=False, feature_weight=float(_qat.get(config, "feature_weight", 1.0)),
                             feature_patterns=distill.UNET_BLOCK_OUTPUTS if qm.meta.get("model_family") != "dit"
                             else distill.DIT_BLOCK_OUTPUTS, steps=int(_qat.get(config, "steps_stage1", 200)))
    qm = distill.distill(qm, c1, groups, pool=pool, step_weights=w, desc=f"{NAME}/I")
    stage1 = qm.meta["distill"]
    # stage II: the noise-prediction loss alone (the config's feature_weight belongs to stage I)
    c2 = distill.config_from(config, base, order="forward", output_weight=0.0, diffusion_weight=1.0,
                             feature_weight=0.0, steps=int(_qat.get(config, "steps_stage2", 100)))
    qm = distill.distill(qm, c2, groups, pool=pool, desc=f"{NAME}/II")
    meta = dict(qm.meta)
    meta["distill"] = {"stage1": stage1, "stage2": meta["distill"],
                       "train_seconds": stage1["train_seconds"] + meta["distill"]["train_seconds"],
                       "stage1_step_weights": [float(v) for v in w]}
    return qm.replace(meta=meta)
  return run


@register(NAME, family="unet_qat/ultra_low_bit", model_families=("unet", "unet_text", "dit"),
          paper="BitsFusion (arXiv 2406.04333)", settings=("W2A16", "W3A16"))
def bitsfusion(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/ultra_low_bit", rules_fn(config), passes(config),
                "sensitivity-driven mixed-precision ~2-bit weights + two-stage distillation")
