"""The quantized forward pass of a plain Flax model: weights by a pure param-tree map, activations by
method interception.

`quantized_apply(model, plan, params, qstate, *args, t=..., mode=...)` is a pure function: enter it inside
`jax.jit` (the interception context is opened inside the traced function, never around a cached one).
Modes:
  'fp'        the model untouched (the same call signature, for paired comparisons);
  'simulate'  fake-quantized weights and activations in float (research, QAT: differentiable);
  'deploy'    weights come from integer / low-float storage (see `dqjax.deploy`), activations as simulate.
`observe` runs the model and returns per-op activation statistics (calibration).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.transform.discover import module_path, op_kind
from dqjax.transform.rules import OpPlan, Plan
from dqjax.transform.state import OpState, QState

MODES = ("fp", "simulate", "deploy")
STATS_COLLECTION = "dqjax_stats"


class UncalibratedError(ValueError):
  pass


# --- weights --------------------------------------------------------------------------------------
def _adaround_offset(v, hard: bool):
  from dqjax.quant import rounding
  return rounding.adaround_offset(v, hard)


def effective_kernel(kernel: jax.Array, st: OpState) -> jax.Array:
  """The float kernel that gets quantized: the stored kernel plus a merged LoRA update, if any."""
  if st.lora is not None:
    a, b = st.lora
    kernel = kernel + (a @ b).reshape(kernel.shape)
  return kernel


def fake_quant_kernel(kernel: jax.Array, op: OpPlan, st: OpState, *, adaround_hard: bool = True) -> jax.Array:
  """Fake-quantize one kernel per the op's weight spec (honouring input splits and AdaRound)."""
  spec = op.weight
  if st.weight is None:
    raise UncalibratedError(f"op {op.path!r}: weight quantizer has no parameters; run a weight calibration "
                            "pass (e.g. dqjax.calib.calibrate_weights) first")
  offset = None if st.rounding is None else _adaround_offset(st.rounding, adaround_hard)
  if op.input_split:
    c = op.input_split
    parts = []
    for sl, qp in ((slice(None, c), st.weight), (slice(c, None), st.weight_split)):
      k = kernel[..., sl, :]
      off = None if offset is None else offset[..., sl, :]
      parts.append(qops.fake_quant(k, qp, spec, rounding_offset=off))
    return jnp.concatenate(parts, axis=-2)
  return qops.fake_quant(kernel, st.weight, spec, rounding_offset=offset)


def get_kernel(params: Any, path: str) -> jax.Array:
  node = params
  for part in path.split("/"):
    node = node[part]
  return node["kernel"]


def replace_kernels(params: Any, new_kernels: dict[str, jax.Array]) -> Any:
  """A copy of `params` with the kernels of the given op paths replaced."""
  if not new_kernels:
    return params
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, k in new_kernels.items():
    key = f"{path}/kernel"
    if key not in flat:
      raise KeyError(f"params have no kernel at {key!r}")
    flat[key] = k
  return traverse_util.unflatten_dict(flat, sep="/")


def quantized_params(plan: Plan, params: Any, qstate: QState, *, adaround_hard: bool = True) -> Any:
  """Params with every planned kernel fake-quantized (simulate mode); LoRA merged where present."""
  new = {}
  for op in plan.ops:
    st = qstate.get(op.path, OpState())
    if op.weight is None and st.lora is None:
      continue
    kernel = effective_kernel(get_kernel(params, op.path), st)
    new[op.path] = kernel if op.weight is None else fake_quant_kernel(kernel, op, st,
                                                                       adaround_hard=adaround_hard)
  return replace_kernels(params, new)


def with_lowrank_branch(out: jax.Array, branch_in: jax.Array, st: OpState) -> jax.Array:
  """`out` plus the op's float low-rank branch (SVDQuant / ViDiT-Q), fed the transformed but unquantized
  input, so the branch absorbs what the quantized main path cannot represent."""
  if st.lowrank is None:
    return out
  a, b = st.lowrank
  return out + ((branch_in @ a) @ b).astype(out.dtype)


def has_input_transform(st: OpState) -> bool:
  return st.smooth is not None or st.rotate is not None or st.lowrank is not None


# --- activations ------------------------------------------------------------------------------------
def _act_params(op: OpPlan, st: OpState, operand: str, t):
  act = st.acts.get(operand)
  if act is None:
    raise UncalibratedError(f"op {op.path!r}: activation operand {operand!r} has no calibrated parameters; "
                            "run an activation calibration pass (dqjax.calib.calibrate_activations) first")
  return tables.lookup(act.qp, act.index, t)


def quantize_operand(x: jax.Array, op: OpPlan, st: OpState, operand: str, t) -> jax.Array:
  spec = op.act_spec(operand)
  if spec is None:
    return x
  if operand == "input" and op.input_split:
    c = op.input_split
    first = _quantize_one(x[..., :c], op, st, "input", spec, t)
    second = _quantize_one(x[..., c:], op, st, "input_split", spec, t)
    return jnp.concatenate([first, second], axis=-1)
  return _quantize_one(x, op, st, operand, spec, t)


def _quantize_one(x, op, st, operand, spec, t):
  if spec.dynamic:
    return qops.fake_quant(x, None, spec)
  return qops.fake_quant(x, _act_params(op, st, operand, t), spec)


def transform_inputs(xs: list, st: OpState) -> list:
  """Equivalent input transforms that precede quantization (smoothing divisor, rotation)."""
  if st.smooth is not None:
    xs[0] = xs[0] / st.smooth
  if st.rotate is not None:
    xs[0] = xs[0] @ st.rotate
  return xs


# stat_fn(op, operand, x) -> {stat name: stat pytree (no dicts inside)} or None
StatFn = Callable[[OpPlan, str, jax.Array], Optional[dict]]


def make_interceptor(plan: Plan, qstate: QState, t, *, quantize_acts: bool = True,
                     stat_fn: Optional[StatFn] = None, stat_reduce: Optional[Callable] = None,
                     int_codes: Optional[dict] = None):
  """The Flax method interceptor that quantizes activation operands of planned ops.

  With `stat_fn`, the (transformed, not yet quantized) operands are also summarised and sown into the
  `dqjax_stats` collection under the op's module scope, one entry per stat name; `stat_reduce(a, b)` merges two
  calls of the same op in one forward pass. `int_codes` ({path: int8 weight codes}, deploy mode) runs the
  eligible Dense/Conv ops with integer kernels.
  """
  by_path = {op.path: op for op in plan.ops}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or op_kind(context.module) is None:
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    op = by_path.get(path)
    st = qstate.get(path, OpState())
    if op is None or not (op.quantized or stat_fn is not None or has_input_transform(st)):
      return next_fun(*args, **kwargs)
    n = len(op.info.operands)
    xs = transform_inputs(list(args[:n]), st)
    branch_in = xs[0]
    if stat_fn is not None:
      for operand, x in zip(op.info.operands, xs):
        for name, stat in (stat_fn(op, operand, x) or {}).items():
          _sow(context.module, name, stat, stat_reduce)
    if int_codes is not None and path in int_codes:
      from dqjax import deploy as deploy_lib
      if deploy_lib.int8_capable(op, st, context.module):
        return deploy_lib.int8_op(context.module, xs[0], int_codes[path], st.weight.scale,
                                  _act_params(op, st, "input", t), op.act_spec("input"))
    if quantize_acts and op.acts:
      xs = [quantize_operand(x, op, st, name, t) for name, x in zip(op.info.operands, xs)]
    return with_lowrank_branch(next_fun(*xs, *args[n:], **kwargs), branch_in, st)

  return interceptor


def _sow(module: nn.Module, name: str, value, reduce):
  if reduce is None:
    module.sow(STATS_COLLECTION, name, value, reduce_fn=lambda prev, new: new, init_fn=lambda: None)
  else:
    module.sow(STATS_COLLECTION, name, value,
               reduce_fn=lambda prev, new: new if prev is None else reduce(prev, new), init_fn=lambda: None)


# --- the public entry points ---------------------------------------------------------------------------
def quantized_apply(model: nn.Module, plan: Plan, params: Any, qstate: QState, *args, t=None,
                    mode: str = "simulate", adaround_hard: bool = True, deployed: Any = None,
                    use_int_kernels: bool = True, method=None, **kwargs):
  """Run `model` quantized. `t` selects timestep-table entries (scalar or [B]); for diffusion models
  called as model(x, t, cond) pass it positionally *and* as `t=` (see `denoiser`)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is unknown; accepted values: {', '.join(MODES)}")
  call = (lambda v, *a, **kw: model.apply(v, *a, **kw)) if method is None else (
      lambda v, *a, **kw: model.apply(v, *a, method=method, **kw))
  if mode == "fp":
    return call({"params": params}, *args, **kwargs)
  int_codes = None
  if mode == "simulate":
    qparams = quantized_params(plan, params, qstate, adaround_hard=adaround_hard)
  else:
    from dqjax import deploy as deploy_lib
    if deployed is None:
      raise ValueError("mode='deploy' needs `deployed` (from dqjax.deploy.deploy_state)")
    qparams = deploy_lib.restore_kernels(plan, params, deployed, qstate)
    int_codes = deploy_lib.int8_codes(plan, deployed) if use_int_kernels else None
  with nn.intercept_methods(make_interceptor(plan, qstate, t, int_codes=int_codes)):
    return call({"params": qparams}, *args, **kwargs)


def observe(model: nn.Module, plan: Plan, params: Any, qstate: QState, stat_fn: StatFn, *args, t=None,
            stat_reduce: Optional[Callable] = None, quantize: bool = False, method=None, **kwargs):
  """Run the model and return `{op path: {stat name: stat}}` from `stat_fn` (pure; jit it).

  `quantize=True` runs the already-calibrated ops quantized while observing (sequential calibration, as
  in BRECQ's "asymmetric" reconstruction inputs); by default the model runs in float.
  """
  use_params = quantized_params(plan, params, qstate) if quantize else params
  interceptor = make_interceptor(plan, qstate if quantize else {}, t, quantize_acts=quantize,
                                 stat_fn=stat_fn, stat_reduce=stat_reduce)
  with nn.intercept_methods(interceptor):
    if method is None:
      _, variables = model.apply({"params": use_params}, *args, mutable=[STATS_COLLECTION], **kwargs)
    else:
      _, variables = model.apply({"params": use_params}, *args, mutable=[STATS_COLLECTION], method=method,
                                 **kwargs)
  flat = traverse_util.flatten_dict(dict(variables.get(STATS_COLLECTION, {})), sep="/")
  out: dict[str, dict] = {}
  for key, value in flat.items():
    path, operand = key.rsplit("/", 1)
    out.setdefault(path, {})[operand] = value
  return out


def denoiser(model: nn.Module, plan: Plan, params: Any, qstate: QState, *, mode: str = "simulate",
             deployed: Any = None, adaround_hard: bool = True) -> Callable:
  """A `denoise(x, t, cond)` function (the sampler interface) for a diffusion model, quantized."""

  def denoise(x, t, cond=None):
    return quantized_apply(model, plan, params, qstate, x, t, cond, t=t, mode=mode, deployed=deployed,
                           adaround_hard=adaround_hard)

  return denoise
