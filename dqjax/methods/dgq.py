"""DGQ: Distribution-Aware Group Quantization for Text-to-Image Diffusion Models (Ryu et al., ICLR 2025;
arXiv 2501.04304; ugonfor/DGQ).

Implemented (following `quant/quant_layer.py::done_group_num`, `quant/quant_layer_text.py::T2ILogQuantizer`,
`diffusers_rewrite/sd.py::Attention_forward` and `scripts/quantize_act.sh`):
- distribution-aware group quantization of activations, with time-aware (per-step) tables: for every
  operand with token or spatial structure (Dense inputs [B, N, C], attention operands [B, H, N, D], conv
  inputs [B, H, W, C]) the per-channel and per-token min/max are recorded over each calibration step
  (min of mins, max of maxes: "minmax is much better than mean"); the axis with the larger spread
  (max(max) − min(max)) + (max(min) − min(min)) is chosen, the channels (or tokens) are clustered by K-means
  on their (min, max) points into `group_num` groups, and each group gets the asymmetric range
  [min of its mins, max of its maxes]. The op's activation spec becomes per-channel along the chosen axis
  with equal parameters inside a group; 2-D inputs (time-embedding layers) keep per-tensor tables as in the
  code;
- prompt-specific log quantization of the attention probabilities (both self- and cross-attention, as the
  code's `aqtizer_w`): Δ·2^(−q), q = clip(round(−log2(p/Δ)), 0, 2^b − 1) with Δ the max of the current
  example's probabilities ("real time", the script's setting) or a calibrated percentile (`log_realtime`);
- start-token exclusion in cross-attention (`attn2`): the first key token's K row and its probability
  column bypass quantization and are concatenated back in float;
- base: the TFMQ-style pipeline the code builds on — conv_in, conv_out, the first time-embedding layer, the
  skip 1×1 and downsample convs in float, the second time-embedding layer without activation quantization;
  MSE-searched per-channel weights (`use_adaround` runs the BRECQ/AdaRound engine as TFMQ's weight pass).

Deliberate deviations: convolution inputs are grouped over input channels only (the code unfolds the input
to im2col and groups the C·k·k rows or the output positions; the rows of one channel differ only by zero
padding); the grouping axis is chosen once per op from all calibration steps (the code decides per
timestep quantizer), since the plan holds one spec per op; K-means is a deterministic Lloyd iteration in JAX
(quantile initialisation) instead of sklearn's; the real-time Δ is per example (prompt) rather than per
batch; activations are observed on the float model.
"""
from __future__ import annotations

import re
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._act_extra import StepTable, as_ext, observe_steps, set_extra
from dqjax.methods._correction import base_rules
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant import log_quant, tables
from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec
from dqjax.transform.state import ActQuant

CROSS_ATTN = r".*attn2/(qk|sv)_matmul"
SOFTMAX_OP = r".*sv_matmul"
TFMQ_KEEP_FP = (r"time_embedding/linear_1", r"conv_in", r"conv_out", r".*conv_shortcut", r".*downsamplers_0/conv")
TFMQ_FP_ACTS = (r"time_embedding/linear_2",)


# --- K-means on (min, max) points -------------------------------------------------------------------------------
def kmeans(points: jax.Array, k: int, iters: int = 30) -> jax.Array:
  """Labels [n] of a deterministic Lloyd K-means of points [n, d] (init: k points at evenly spaced ranks of
  the points ordered by their coordinate sum; empty clusters keep their centre)."""
  n = points.shape[0]
  order = jnp.argsort(jnp.sum(points, -1))
  centres = points[order[jnp.round(jnp.linspace(0, n - 1, k)).astype(jnp.int32)]]

  def assign(c):
    return jnp.argmin(jnp.sum((points[:, None, :] - c[None]) ** 2, -1), axis=1)

  def step(c, _):
    onehot = jax.nn.one_hot(assign(c), k, dtype=points.dtype)
    cnt = onehot.sum(0)
    new = (onehot.T @ points) / jnp.maximum(cnt, 1.0)[:, None]
    return jnp.where(cnt[:, None] > 0, new, c), None

  centres, _ = jax.lax.scan(step, centres, None, length=iters)
  return assign(centres)


def group_ranges(lo: jax.Array, hi: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Per-element (lo, hi) replaced by its K-means group's (min lo, max hi); vmapped over a leading step axis."""
  def one(l, h):
    n = l.shape[0]
    if n <= k:
      return l, h
    lab = kmeans(jnp.stack([l, h], -1), k)
    glo = jax.ops.segment_min(l, lab, k)
    ghi = jax.ops.segment_max(h, lab, k)
    return glo[lab], ghi[lab]
  return jax.jit(jax.vmap(one))(lo, hi)


def spread(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """DGQ's spread degree of per-element ranges: (max(hi) − min(hi)) + (max(lo) − min(lo))."""
  return (jnp.max(hi) - jnp.min(hi)) + (jnp.max(lo) - jnp.min(lo))


# --- which operands are grouped, along which axes ----------------------------------------------------------------
def _excluded(path: str, operand: str, cross_pattern: str) -> bool:
  if not re.fullmatch(cross_pattern, path):
    return False
  return (path.endswith("qk_matmul") and operand == "rhs") or (path.endswith("sv_matmul") and operand == "lhs")


def _exclusion_axis(path: str, ndim: int) -> int:
  return ndim - 2 if path.endswith("qk_matmul") else ndim - 1


def candidate_axes(op, operand: str) -> tuple[int, ...]:
  """Axes (negative) a group quantizer may run along: channels (-1) and, for token sequences, tokens (-2)."""
  shape = op.info.input_shapes[op.info.operands.index(operand)]
  if len(shape) <= 2:
    return ()
  if op.info.kind == "conv" or (op.info.kind == "dense" and len(shape) != 3):
    return (-1,)
  return (-1, -2)


def group_stats(qm, data: CalibData, targets: dict, cross_pattern: str):
  """{path: {operand: {axis: (lo [S, n], hi [S, n])}}} per calibration step (float model)."""
  def make(t):
    def stat_fn(op, operand, x):
      axes = targets.get(op.path, {}).get(operand)
      if not axes:
        return None
      if _excluded(op.path, operand, cross_pattern):
        ax = _exclusion_axis(op.path, x.ndim)
        x = jax.lax.slice_in_dim(x, 1, x.shape[ax], axis=ax)
      out = []
      for a in axes:
        red = tuple(i for i in range(x.ndim) if i != x.ndim + a)
        out.append((jnp.min(x, red), jnp.max(x, red)))
      return {operand: tuple(out)}
    return stat_fn

  merge = lambda a, b: tuple((jnp.minimum(p[0], q[0]), jnp.maximum(p[1], q[1])) for p, q in zip(a, b))
  return observe_steps(qm, data, make, merge)


def _param_table(lo, hi, axis: int, ndim: int, spec: QuantSpec):
  """Per-step params [S, 1.., n, ..1] broadcasting against an operand of rank `ndim` along `axis`."""
  s, n = lo.shape
  shape = [1] * ndim
  shape[ndim + axis] = n
  return qops.params_from_range(lo.reshape((s,) + tuple(shape)), hi.reshape((s,) + tuple(shape)), spec)


def group_pass(config):
  """Pass: per-step activation tables with DGQ's distribution-aware groups, log2 softmax, start tokens."""
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data: CalibData):
    a_bits = qm.meta.get("a_bits", 8)
    if a_bits >= 16:
      return qm
    table = tables.TableSpec("per_step" if get("time_aware", True) else "static")
    qm = calibrate.calibrate_activations(qm, data, get("act_init", "mse"), table=table, p=2.4,
                                         batch_size=get("calib_batch", None))
    k = int(get("group_num", 8))
    cross = get("cross_pattern", CROSS_ATTN)
    log_ops = [op for op in qm.plan.ops if re.fullmatch(SOFTMAX_OP, op.path) and op.act_spec("lhs") is not None]
    log_paths = {op.path for op in log_ops} if get("log_quant", True) else set()
    targets = {}
    if k > 1:
      for op in qm.plan.ops:
        for name, spec in op.acts:
          if spec.dynamic or (op.path in log_paths and name == "lhs") or op.input_split:
            continue
          axes = candidate_axes(op, name)
          if axes:
            targets.setdefault(op.path, {})[name] = axes
    steps_t = np.asarray(data.ts).astype(int).tolist()
    n_entries = tables.num_entries(table, steps_t)
    entry = jnp.asarray(tables.entry_of_steps(table, steps_t))
    index = jnp.asarray(tables.timestep_index(table, steps_t, qm.num_train_timesteps)) if n_entries > 1 else None
    chosen = {}
    if targets:
      stats = group_stats(qm, data, targets, cross)
      plan, qstate = qm.plan, dict(qm.qstate)
      for path, by in targets.items():
        op = plan[path]
        acts = dict(op.acts)
        st = qstate[path]
        for name, axes in by.items():
          ranges = stats[path][name]
          # choose the axis with the larger spread of per-element ranges (over all steps)
          sp = [float(spread(jnp.min(lo, 0), jnp.max(hi, 0))) for lo, hi in ranges]
          j = int(np.argmax(sp))
          lo, hi = ranges[j]
          lo = jax.ops.segment_min(lo, entry, n_entries)
          hi = jax.ops.segment_max(hi, entry, n_entries)
          glo, ghi = group_ranges(lo, hi, k)
          spec = QuantSpec("int", acts[name].bits, symmetric=False, granularity="channel", axis=axes[j])
          ndim = len(op.info.input_shapes[op.info.operands.index(name)])
          qp = _param_table(glo, ghi, axes[j], ndim, spec)
          acts[name] = spec
          st = st.replace_act(name, ActQuant(qp, index))
          chosen[f"{path}:{name}"] = "channel" if axes[j] == -1 else "token"
        plan = plan.with_specs(path, acts=tuple((n, acts[n]) for n, _ in op.acts))
        qstate[path] = st
      qm = qm.replace(plan=plan, qstate=qstate)
    qm = as_ext(qm)
    # log2 quantization of the softmax probabilities (prompt-specific Δ, or calibrated per step)
    realtime = bool(get("log_realtime", True))
    deltas = {} if realtime or not log_paths else log_deltas(qm, data, log_paths, cross, a_bits)
    for path in sorted(log_paths):
      value = jnp.zeros(()) if realtime else StepTable(deltas[path][entry_first(entry, n_entries)], index)
      qm = set_extra(qm, path, "log2", "lhs", value)
    if get("start_token", True):
      for op in qm.plan.ops:
        if re.fullmatch(cross, op.path):
          operand = "rhs" if op.path.endswith("qk_matmul") else "lhs"
          if op.act_spec(operand) is not None:
            qm = set_extra(qm, op.path, "exclude_first", operand, jnp.zeros(()))
    return qm.replace(meta={**qm.meta, "dgq_axes": chosen, "dgq_log2": sorted(log_paths)})

  return run


def entry_first(entry, n_entries: int):
  """For every table entry, the first calibration step that feeds it."""
  e = np.asarray(entry)
  return np.array([int(np.argmax(e == i)) for i in range(n_entries)])


def log_deltas(qm, data: CalibData, paths: set, cross: str, bits: int) -> dict:
  """{path: Δ [S]}: the calibrated log2 Δ of every softmax op per calibration step (start column excluded
  in cross-attention)."""
  def make(t):
    def stat_fn(op, operand, x):
      if op.path not in paths or operand != "lhs":
        return None
      if _excluded(op.path, operand, cross):
        x = x[..., 1:]
      return {"log2": log_quant.search_delta(x, bits)}
    return stat_fn

  stats = observe_steps(qm, data, make, jnp.maximum)
  return {p: stats[p]["log2"] for p in paths}


@register("dgq", family="unet_ptq/text_image", model_families=("unet_text",), paper="DGQ (arXiv 2501.04304)")
def dgq(config=None) -> Recipe:
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True,
                     keep_fp=TFMQ_KEEP_FP, fp_acts=TFMQ_FP_ACTS)
  get = lambda k, d: common.config_get(config, k, d)
  weights = [common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0)]
  if get("use_adaround", False):
    from dqjax.calib import reconstruct as rc
    weights.append(rc.reconstruction_pass(
        rc.config_from(config, "recon_", rc.ReconConfig(iters=200, lr_w=1e-2, num_samples=256)), phase="weights"))
  return Recipe("dgq", "unet_ptq/text_image", rules, chain(*weights, group_pass(config)),
                "distribution-aware K-means group quantization of activations (channel or token groups, per "
                "step), prompt-specific log2 softmax, start-token exclusion in cross-attention")

