"""Activation-side extras of the error-correction and text-image methods, kept in `OpState.extra` and
honoured by a thin extension of the core's quantized forward (`ExtQModel`).

The core quantizes each activation operand with a uniform grid whose parameters may depend on the
timestep. These methods need four small additions, each an `OpState.extra` entry whose *presence* selects it
at trace time (arrays only, so the state stays a pytree):

  'offset'        {operand: StepTable}  an additive constant on the dequantized operand (SBC: the expected
                  bias E[p − Q(p)] of the quantized softmax, per head and step; in deployment it folds into
                  the quantizer's offset, so it costs nothing).
  'hi_acts'       {operand: ActQuant} + 'hi_on' bool [T]: at the timesteps flagged in `hi_on` the operand is
                  quantized with these parameters at `meta['hi_act_bits']` bits (≥ 16: left in float) instead
                  of the plan's bits — PTQD's step-aware mixed precision and PCR's activation relaxing.
  'log2'          {operand: StepTable | marker}: a log2 quantizer (`dqjax.quant.log_quant`) at the plan's bits
                  replaces the uniform one (DGQ's cross-attention probabilities); a StepTable holds calibrated
                  Δ per step, a scalar marker means Δ = max of each example ("real time", prompt-specific).
  'exclude_first' {operand: marker}: the first key token (the key axis 'k' of the op's einsum) is left in float
                  and the rest quantized (DGQ's start-token handling in cross-attention).

Every other op runs the core interceptor unchanged, so a model without extras computes exactly what
`QModel` computes. `ExtQModel` is a `QModel` whose `apply`/`denoiser` use this forward, so the benchmark and
the samplers use it unchanged. Deploy mode is refused for models that carry extras.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dqjax.methods.recipe import QModel
from dqjax.quant import log_quant
from dqjax.transform import apply as qapply
from dqjax.transform.discover import module_path
from dqjax.transform.rules import Plan
from dqjax.transform.state import OpState

EXTRA_KEYS = ("offset", "hi_acts", "log2", "exclude_first")


@struct.dataclass
class StepTable:
  """Values with a leading entry axis [E, ...] and the int32 [T] timestep → entry index (None when E = 1)."""
  value: jax.Array
  index: Optional[jax.Array] = None


def has_extras(qstate) -> bool:
  return any(k in st.extra for st in qstate.values() for k in EXTRA_KEYS)


def lookup(table: StepTable, t, x):
  """The entry for timestep(s) t, shaped to broadcast against x: an entry of shape e applies to x's axes
  1 … len(e) (the axes after the batch); with a [B] timestep vector every example gets its own entry."""
  v = table.value
  e = v.shape[1:]
  if table.index is None or t is None or v.shape[0] == 1:
    return v[0].reshape((1,) + e + (1,) * (x.ndim - 1 - len(e)))
  # (not tables.lookup: its per-example form expects activation qparams with a size-1 batch axis)
  ti = jnp.clip(jnp.round(jnp.asarray(t)).astype(jnp.int32), 0, table.index.shape[0] - 1)
  out = v[table.index[ti]]
  b = out.shape[0] if out.ndim > len(e) else 1
  return out.reshape((b,) + e + (1,) * (x.ndim - 1 - len(e)))


def key_axis(module: nn.Module, operand_index: int) -> int:
  """The axis of the key index ('k') in one operand of a MatMul's einsum equation."""
  subs = module.equation.split("->")[0].split(",")[operand_index]
  if "k" not in subs:
    raise ValueError(f"start-token exclusion needs a key axis 'k' in operand {operand_index} of the einsum "
                     f"{module.equation!r} of {module_path(module)!r}")
  return subs.index("k")


def _hi_on(st: OpState, t, x):
  on = st.extra["hi_on"]
  if t is None:
    return jnp.zeros((), bool)
  ti = jnp.clip(jnp.round(jnp.asarray(t)).astype(jnp.int32), 0, on.shape[0] - 1)
  flag = on[ti]
  return flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim)) if flag.ndim else flag


def quantize_operand(x, op, st: OpState, operand: str, t, *, hi_bits: int, module=None, operand_index: int = 0):
  """One operand through the core quantizer plus this module's extras (see the module docstring)."""
  spec = op.act_spec(operand)
  ex = st.extra
  first = None
  if operand in ex.get("exclude_first", {}):
    ax = key_axis(module, operand_index)
    first = jax.lax.slice_in_dim(x, 0, 1, axis=ax)
    x = jax.lax.slice_in_dim(x, 1, x.shape[ax], axis=ax)
  if spec is None:
    q = x
  elif operand in ex.get("log2", {}):
    d = ex["log2"][operand]
    delta = lookup(d, t, x) if isinstance(d, StepTable) else log_quant.realtime_delta(x)
    q = log_quant.log2_fake_quant(x, delta, spec.bits)
  else:
    q = qapply.quantize_operand(x, op, st, operand, t)
  if operand in ex.get("offset", {}):
    q = q + lookup(ex["offset"][operand], t, x).astype(q.dtype)
  if operand in ex.get("hi_acts", {}) and spec is not None:
    if hi_bits >= 16:
      q_hi = x
    else:
      op_hi = dataclasses.replace(op, acts=tuple((n, s.replace(bits=int(hi_bits))) for n, s in op.acts))
      q_hi = qapply.quantize_operand(x, op_hi, st.replace(acts=ex["hi_acts"]), operand, t)
    q = jnp.where(_hi_on(st, t, x), q_hi, q)
  if first is not None:
    q = jnp.concatenate([first, q], axis=ax)
  return q


def make_interceptor(plan: Plan, qstate, t, *, hi_bits: int = 8):
  """The core interceptor, with this module's extras on the ops that carry them."""
  core = qapply.make_interceptor(plan, qstate, t)
  by_path = {op.path: op for op in plan.ops}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    st = qstate.get(path)
    op = by_path.get(path)
    if st is None or op is None or not any(k in st.extra for k in EXTRA_KEYS):
      return core(next_fun, args, kwargs, context)
    n = len(op.info.operands)
    xs = qapply.transform_inputs(list(args[:n]), st)
    branch_in = xs[0]
    xs = [quantize_operand(x, op, st, name, t, hi_bits=hi_bits, module=context.module, operand_index=i)
          for i, (name, x) in enumerate(zip(op.info.operands, xs))]
    return qapply.with_lowrank_branch(next_fun(*xs, *args[n:], **kwargs), branch_in, st)

  return interceptor


def ext_apply(model: nn.Module, plan: Plan, params: Any, qstate, x, t, cond=None, *, hi_bits: int = 8):
  """The extended simulate-mode forward `model(x, t, cond)`."""
  qparams = qapply.quantized_params(plan, params, qstate)
  with nn.intercept_methods(make_interceptor(plan, qstate, t, hi_bits=hi_bits)):
    return model.apply({"params": qparams}, x, t, cond)


@dataclasses.dataclass(frozen=True)
class ExtQModel(QModel):
  """A QModel whose quantized forward honours the extras above (`meta['hi_act_bits']` sets the relaxed bits)."""

  @property
  def hi_bits(self) -> int:
    return int(self.meta.get("hi_act_bits", 8))

  def apply(self, x, t, cond=None, *, mode: str = "simulate", **kw):
    if mode == "fp" or not has_extras(self.qstate):
      return super().apply(x, t, cond, mode=mode, **kw)
    if mode != "simulate":
      raise ValueError(f"mode={mode!r} is not supported with activation extras; accepted values: simulate, fp")
    return ext_apply(self.model, self.plan, self.params, self.qstate, x, t, cond, hi_bits=self.hi_bits)

  def denoiser(self, mode: str = "simulate", **kw):
    if mode == "fp" or not has_extras(self.qstate):
      return super().denoiser(mode, **kw)
    if mode != "simulate":
      raise ValueError(f"mode={mode!r} is not supported with activation extras; accepted values: simulate, fp")
    model, plan, params, qstate, bits = self.model, self.plan, self.params, self.qstate, self.hi_bits
    return lambda x, t, cond=None: ext_apply(model, plan, params, qstate, x, t, cond, hi_bits=bits)


def as_ext(qm: QModel) -> ExtQModel:
  if isinstance(qm, ExtQModel):
    return qm
  return ExtQModel(**{f.name: getattr(qm, f.name) for f in dataclasses.fields(QModel)})


def set_extra(qm: QModel, path: str, key: str, operand: str, value) -> ExtQModel:
  """The model (as an ExtQModel) with `extra[key][operand] = value` on op `path`."""
  qm = as_ext(qm)
  st = qm.qstate.get(path, OpState())
  extra = dict(st.extra)
  entry = dict(extra.get(key, {}))
  entry[operand] = value
  extra[key] = entry
  qstate = dict(qm.qstate)
  qstate[path] = st.replace(extra=extra)
  return qm.replace(qstate=qstate)


def set_step_precision(qm: QModel, hi_qm: QModel, on_timesteps, hi_bits: int) -> ExtQModel:
  """Relax activations at the flagged timesteps: every statically quantized operand of `qm` gets the
  parameters calibrated in `hi_qm` (same model, activations at `hi_bits`; ignored when hi_bits ≥ 16) and the
  bool [T] table `on_timesteps`."""
  qm = as_ext(qm)
  on = jnp.asarray(on_timesteps, bool)
  if on.shape != (qm.num_train_timesteps,):
    raise ValueError(f"on_timesteps has shape {on.shape}; expected ({qm.num_train_timesteps},)")
  qstate = dict(qm.qstate)
  for op in qm.plan.ops:
    statics = [n for n, s in op.acts if not s.dynamic]
    if not statics:
      continue
    st = qstate[op.path]
    hi_st = hi_qm.qstate.get(op.path, OpState()) if hi_qm is not None else OpState()
    hi_acts = dict(st.acts) if hi_bits >= 16 else dict(hi_st.acts)
    extra = dict(st.extra)
    extra["hi_acts"] = hi_acts
    extra["hi_on"] = on
    qstate[op.path] = st.replace(extra=extra)
  return qm.replace(qstate=qstate, meta={**qm.meta, "hi_act_bits": int(hi_bits)})


def flags_to_timesteps(flags, step_ts, num_train_timesteps: int):
  """bool [T]: a per-step flag spread over all training timesteps (each takes its nearest step's flag)."""
  import numpy as np
  from dqjax.quant.tables import TableSpec, timestep_index
  flags = np.asarray(flags, bool)
  entry = timestep_index(TableSpec("per_step"), np.asarray(step_ts).astype(int).tolist(), num_train_timesteps)
  return jnp.asarray(flags[entry])


def observe_steps(qm, data, make_stat_fn, merge, *, quantize: bool = False):
  """One compiled pass over the calibration steps: `qapply.observe` on each step's samples (all at once)
  with the stat function `make_stat_fn(t)` (t: the step's traced timestep, for table lookups); stats come
  back with a leading step axis [S, ...]."""
  model, plan = qm.model, qm.plan

  @jax.jit
  def run(params, qstate, xs, ts, conds):
    def one(a):
      x, t, c = a
      tb = jnp.full((x.shape[0],), t, jnp.float32)
      return qapply.observe(model, plan, params, qstate, make_stat_fn(t), x, tb, c, t=tb, stat_reduce=merge,
                            quantize=quantize)
    return jax.lax.map(one, (xs, jnp.asarray(ts, jnp.float32), conds))

  return run(qm.params, qm.qstate, data.xs, data.ts, data.conds)
