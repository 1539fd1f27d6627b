"""HQ-DiT: efficient diffusion transformer with FP4 hybrid quantization (Liu & Zhang, arXiv 2405.19751).
No public code; implemented from the paper's abstract and summary pages.

Implemented:
* **Floating-point W/A quantization** (FP4 at 4 bits: W4A4 in FP4, the paper's headline setting): weights
  per output channel, activations per tensor (static), both with a per-tensor/channel FP scale.
* **Data-distribution-driven format and clipping selection, per layer**: for each layer, every candidate
  format of the bit width is fitted to the layer's weights and to its calibration activations (clipping by
  the Lp shrink search) and the one with the least quantization MSE is kept, separately for weights and
  activations. Candidates at 4 bits: FP4 E2M1 and E1M2 (E1M2's grid ±{0, ½, 1, …, 3½} is exactly the
  narrow-range symmetric int4 grid, so it is expressed as int4 narrow); at 8 bits E4M3, E5M2 and E1M6
  (= narrow int8); at 6 bits E3M2, E2M3 and E1M4 (= narrow int6).
* **Universal identity transform = Hadamard rotation**: every quantized layer's input is rotated,
  XW = (XR)(RᵀW), spreading channel outliers before the activation format is chosen.

Deviations: E3M0 (a pure power-of-two grid) is not a format of the core's `QuantSpec` and is not among the
candidates. dit-mnist's width 96 is not a power of two, so R is a block-diagonal Hadamard (three 32×32
blocks) with random ±1 signs (config `rotation`: 'kron' = H_32 ⊗ a random orthogonal 3×3 mixes all
channels; 'random' = random orthogonal). The paper's FP-adapted GPTQ for the weights is not implemented
(weights use the MSE clipping search). Layers kept float: the timestep/class embedders and attention
matmuls (the paper quantizes the linear layers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dqjax.calib import search
from dqjax.calib import smoothing as sm
from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant import ops as qops
from dqjax.quant.spec import FLOAT_FORMATS, QuantSpec
from dqjax.transform import param_transforms as pt

FAMILY = "dit_ptq/channel_equalization"
# name -> spec factory (granularity filled in later)
_FLOAT_BY_BITS = {4: ("fp4_e2m1",), 6: ("fp6_e3m2", "fp6_e2m3"), 8: ("fp8_e4m3", "fp8_e5m2")}


def format_candidates(bits: int) -> tuple[str, ...]:
  """Candidate formats of one bit width: the core's FP formats plus 'int<b>' (narrow symmetric int = E1M(b−2))."""
  return _FLOAT_BY_BITS.get(bits, ()) + (f"int{bits}",)


def spec_for(fmt: str, *, granularity: str, axis: int = -1) -> QuantSpec:
  if fmt in FLOAT_FORMATS:
    return QuantSpec(fmt, granularity=granularity, axis=axis)
  if fmt.startswith("int"):
    return QuantSpec("int", int(fmt[3:]), symmetric=True, narrow_range=True, granularity=granularity, axis=axis)
  raise ValueError(f"format {fmt!r} is unknown; accepted: {', '.join(FLOAT_FORMATS)} or int<bits>")


@functools.partial(jax.jit, static_argnames=("spec",))
def weight_format_error(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  """Quantization MSE of a kernel in one format (MSE-searched clipping per channel)."""
  q = sm.quantize_weight(kernel, spec, "mse")
  return jnp.mean((q - kernel) ** 2)


@functools.partial(jax.jit, static_argnames=("spec",))
def act_format_error(rows: jax.Array, spec: QuantSpec) -> jax.Array:
  """Per-tensor quantization MSE of activation rows with an MSE-searched clipping range."""
  flat = rows.reshape(1, -1)
  lo, hi = search.mse_range(flat, spec, num_candidates=50, p=2.0)
  qp = qops.params_from_range(lo.reshape(()), hi.reshape(()), spec)
  return jnp.mean((qops.fake_quant(rows, qp, spec) - rows) ** 2)


def rotate_pass(kind: str = "block_hadamard", seed: int = 0):
  """Rotate the input of every quantized 2-D Dense op (ops of one shared-input group share R)."""
  def run(qm, data):
    groups = sm.generic_groups(qm.plan)
    for i, g in enumerate(groups):
      ks = [sm.kernel_of(qm, p) for p in g.paths]
      if any(k.ndim != 2 for k in ks) or not qm.plan[g.paths[0]].acts:
        continue
      r = sm.rotation_matrix(kind, ks[0].shape[0], jax.random.fold_in(jax.random.key(seed), i))
      for p in g.paths:
        qm = pt.rotate(qm, p, r)
    return qm
  return run


def format_pass(*, samples_per_step: int = 4, max_rows: int = 4096, seed: int = 0):
  """Choose every layer's weight and activation format by quantization MSE (after the rotation)."""
  def run(qm, data):
    act_ops = [op for op in qm.plan.ops if op.act_spec("input") is not None and op.info.kind != "matmul"]
    rows = sm.capture_rows(qm, data, [op.path for op in act_ops], samples_per_step=samples_per_step,
                           max_rows=max_rows, seed=seed) if act_ops else {}
    plan, chosen = qm.plan, {}
    for op in qm.plan.ops:
      w_spec, a_spec = op.weight, op.act_spec("input")
      new_w, new_a = w_spec, a_spec
      if w_spec is not None:
        k = sm.kernel_of(qm, op.path)
        errs = {f: float(weight_format_error(k, spec_for(f, granularity=w_spec.granularity, axis=w_spec.axis)))
                for f in format_candidates(w_spec.effective_bits)}
        best = min(errs, key=errs.get)
        new_w = spec_for(best, granularity=w_spec.granularity, axis=w_spec.axis)
        chosen.setdefault(op.path, {})["weight"] = best
      if a_spec is not None and op.path in rows:
        errs = {f: float(act_format_error(rows[op.path], spec_for(f, granularity="tensor")))
                for f in format_candidates(a_spec.effective_bits)}
        best = min(errs, key=errs.get)
        new_a = spec_for(best, granularity="tensor")
        chosen.setdefault(op.path, {})["act"] = best
      if new_w is not w_spec or new_a is not a_spec:
        acts = tuple((n, new_a if n == "input" else s) for n, s in op.acts)
        plan = plan.with_specs(op.path, weight=new_w, acts=acts)
    return qm.replace(plan=plan, meta={**qm.meta, "hqdit_formats": chosen})
  return run


def _fmt(bits: int) -> QuantSpec:
  """The default spec of a bit width before the per-layer choice: the paper's FP format (E2M1 at 4 bits)."""
  fl = _FLOAT_BY_BITS.get(bits)
  return QuantSpec(fl[0]) if fl else QuantSpec("int", bits, symmetric=True, narrow_range=True)


def _rules(config):
  def rules(w_bits, a_bits, model_family="dit"):
    w = _fmt(w_bits).replace(granularity="channel", axis=-1)
    a = None if a_bits >= 16 else _fmt(a_bits).replace(granularity="tensor")
    keep = sm.skip_patterns(model_family, tuple(common.config_get(config, "keep_fp", ("embed",))))
    return sm.build_rules(w, a, keep_fp=keep)
  return rules


@register("hqdit", family=FAMILY, model_families=("dit",),
          paper="HQ-DiT (Liu & Zhang, arXiv 2405.19751)")
def hqdit(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  passes = []
  if get("rotation", "block_hadamard"):
    passes.append(rotate_pass(get("rotation", "block_hadamard"), get("seed", 0)))
  if get("format_search", True):
    passes.append(format_pass(samples_per_step=get("search_samples_per_step", 4), max_rows=get("search_rows", 4096),
                              seed=get("seed", 0)))
  passes += [common.calibrate_weights_pass("mse", num_candidates=get("candidates", 100), p=2.0),
             common.calibrate_activations_pass("mse", batch_size=get("batch_size", None),
                                               num_candidates=get("candidates", 100), p=2.0)]
  return Recipe("hqdit", FAMILY, _rules(config), chain(*passes),
                "FP4/FP8 weights and activations, per-layer format + clipping choice, Hadamard rotation")
