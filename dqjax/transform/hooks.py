"""Extended quantized forward: method-specific quantizers kept in `OpState.extra`, on top of the core's
simulate mode (`dqjax.transform.apply`), plus capture of intermediate module outputs for distillation.

The core expresses uniform/binary/float fake quantization with LSQ gradients, LoRA merged before weight
quantization and timestep tables for activations. The QAT and ultra-low-bit papers need a few quantizers
beyond that; each is a named entry of `OpState.extra` whose *presence* selects it at trace time (arrays only,
so the state stays a pytree that can be trained, checkpointed and vmapped):

weights (the first present wins; any other op uses the core's `fake_quant_kernel`):
  'lmb'      {'alpha1', 'alpha2'?}  BinaryDM's learnable multi-basis binarizer (order 2 when alpha2 exists).
  'xnor'     {}  sign(W)·mean|W| per output channel with the scale recomputed every forward and detached
             (BiDM's weights; BinaryDM's order-1 layers, whose α is re-initialised at every forward).
  'tuneqdm'  {'codes', 'scale', 'd_out', 'd_in', 'index'}  TuneQDM: frozen W_int − z and channel scale times
             relative expert scales selected by the timestep (tables [E, ...], int32 index over timesteps).
  'intlora'  {'codes', 's', 'r', 'a', 'b', 'qs_scale'?, 'qs_zero'?}  IntLoRA: multiplicative integer LoRA;
             with 'qs_scale' the MUL variant (s' quantized per channel), without it SHIFT (power of two).
  'gate'     {'start'}  progressive binarization (BinaryDM): before training step `start` the op keeps its
             float weight; outside training (`step=None`) the gate is open.
activations (replace the core's activation quantizer of the op):
  'bin_act'  {'tau'}  BiDM: sign(x + τ) with the ApproxSign backward; convolution outputs are rescaled by the
             XNOR map K = avgpool_k(mean_c |x|).
  'taq'      {'mu': {operand: [E]}, 'sigma': {operand: [E]}, 'index'}  Q-DM's timestep-aware quantization:
             the operand is standardised with the statistics of its timestep, quantized by the op's static
             quantizer (shared, learnable), and de-standardised.
output:
  'shortcut' {'gamma', 'kernel'?}  BinaryDM/BiDM's learnable scaled shortcut around a binary convolution:
             y + |γ|·shortcut(x) (identity, average pooling for strided convs, or a 1×1 `kernel` when the
             channel counts differ).

`QATModel` is a `QModel` whose `apply`/`denoiser` use this forward, so the benchmark samples the extended
model unchanged. Deploy mode (integer storage) is not defined for these quantizers and raises.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dqjax.methods.recipe import QModel
from dqjax.quant import lowbit
from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.quant.spec import QuantSpec
from dqjax.transform import apply as qapply
from dqjax.transform.discover import module_path, op_kind
from dqjax.transform.rules import Plan
from dqjax.transform.state import OpState

WEIGHT_HOOKS = ("lmb", "xnor", "tuneqdm", "intlora")
ACT_HOOKS = ("bin_act", "taq")
ALL_HOOKS = WEIGHT_HOOKS + ACT_HOOKS + ("gate", "shortcut")


def has_hooks(qstate) -> bool:
  return any(k in ALL_HOOKS for st in qstate.values() for k in st.extra)


def weight_hook(st: Optional[OpState]) -> Optional[str]:
  if st is None:
    return None
  for k in WEIGHT_HOOKS:
    if k in st.extra:
      return k
  return None


def act_hook(st: Optional[OpState]) -> Optional[str]:
  if st is None:
    return None
  for k in ACT_HOOKS:
    if k in st.extra:
      return k
  return None


def _first_t(t):
  """The timestep that selects a weight expert: samplers feed equal timesteps to a batch; training batches of
  the timestep-specific methods are drawn one timestep at a time (see `dqjax.calib.distill`)."""
  t = jnp.asarray(t)
  return t if t.ndim == 0 else t.reshape(-1)[0]


def _hooked_kernel(kind: str, kernel, op, st: OpState, t):
  ex = st.extra[kind]
  if kind == "lmb":
    return lowbit.lmb_weight(kernel, ex["alpha1"], ex.get("alpha2"))
  if kind == "xnor":
    return lowbit.xnor_weight(kernel)
  if kind == "tuneqdm":
    e = ex["index"][jnp.clip(jnp.round(_first_t(t)).astype(jnp.int32), 0, ex["index"].shape[0] - 1)] \
        if t is not None else 0
    return lowbit.tuneqdm_weight(ex["codes"], ex["scale"] * ex["d_out"][e], ex["d_in"][e])
  # intlora
  delta = (ex["a"] @ ex["b"]).reshape(ex["codes"].shape)
  s_prime = lowbit.intlora_scale(ex["codes"], ex["s"], ex["r"], delta)
  if "qs_scale" in ex:
    spec = intlora_scale_spec(op.weight)
    return lowbit.intlora_merge(ex["codes"], s_prime, spec, qops.QParams(ex["qs_scale"], ex["qs_zero"]), "mul")
  return lowbit.intlora_merge(ex["codes"], s_prime, None, None, "shift")


def intlora_scale_spec(weight_spec: Optional[QuantSpec]) -> QuantSpec:
  """IntLoRA quantizes the adapted scale s' per output channel, asymmetric, at the weight's bit width."""
  bits = 8 if weight_spec is None or weight_spec.format != "int" else int(weight_spec.bits)
  return QuantSpec("int", bits, symmetric=False, granularity="channel", axis=-1)


def extended_params(plan: Plan, params: Any, qstate, t=None, step=None, *, adaround_hard: bool = True) -> Any:
  """Params with every planned kernel quantized: hooked ops by their quantizer, the rest by the core."""
  hooked = {op.path for op in plan.ops if weight_hook(qstate.get(op.path)) is not None}
  gated = {op.path for op in plan.ops if qstate.get(op.path) is not None and "gate" in qstate[op.path].extra}
  core_plan = plan
  if hooked:
    core_plan = Plan(tuple(dataclasses.replace(op, weight=None) if op.path in hooked else op for op in plan.ops))
  qparams = qapply.quantized_params(core_plan, params, qstate, adaround_hard=adaround_hard)
  new = {}
  for op in plan.ops:
    st = qstate.get(op.path)
    kind = weight_hook(st)
    if kind is None and op.path not in gated:
      continue
    if kind is not None:
      kernel = qapply.effective_kernel(qapply.get_kernel(params, op.path), st)
      wq = _hooked_kernel(kind, kernel, op, st, t)
    else:
      wq = qapply.get_kernel(qparams, op.path)
    if op.path in gated and step is not None:
      w_fp = qapply.effective_kernel(qapply.get_kernel(params, op.path), st)
      on = (jnp.asarray(step) >= st.extra["gate"]["start"]).astype(wq.dtype)
      wq = w_fp + on * (wq - w_fp)
    new[op.path] = wq
  return qapply.replace_kernels(qparams, new)


# --- activations ------------------------------------------------------------------------------------
def _bcast_batch(v, like):
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape((v.shape[0],) + (1,) * (like.ndim - 1))


def _conv_geometry(module):
  kernel_size = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
  strides = module.strides
  if strides is None:
    strides = (1,) * len(kernel_size)
  elif isinstance(strides, int):
    strides = (strides,) * len(kernel_size)
  return kernel_size, tuple(strides), module.padding


def _bin_act_call(next_fun, args, kwargs, module, op, st):
  x = args[0]
  xb = lowbit.approx_sign(x + st.extra["bin_act"]["tau"])
  out = next_fun(xb, *args[1:], **kwargs)
  if op_kind(module) == "conv":
    k, s, p = _conv_geometry(module)
    out = out * lowbit.xnor_scale_map(x, k, s, p).astype(out.dtype)
  return out


def _taq_call(next_fun, args, kwargs, op, st, t):
  ex = st.extra["taq"]
  n = len(op.info.operands)
  xs = list(args[:n])
  for i, name in enumerate(op.info.operands):
    spec = op.act_spec(name)
    if spec is None or name not in ex["mu"]:
      continue
    stats = tables.lookup({"mu": ex["mu"][name], "sigma": ex["sigma"][name]}, ex["index"], t)
    mu, sigma = _bcast_batch(stats["mu"], xs[i]), _bcast_batch(stats["sigma"], xs[i])
    z = (xs[i] - mu) / sigma
    if spec.dynamic:
      zq = qops.fake_quant(z, None, spec)
    else:
      act = st.acts.get(name)
      if act is None:
        raise qapply.UncalibratedError(f"op {op.path!r}: TaQ operand {name!r} has no quantizer parameters")
      zq = qops.fake_quant(z, tables.lookup(act.qp, act.index, t), spec)
    xs[i] = zq * sigma + mu
  return next_fun(*xs, *args[n:], **kwargs)


def _shortcut(x, out, module, st):
  """|γ|·shortcut(x) shaped like `out` (NHWC convolutions only). A downsampling conv's input can be one row and
  column larger than stride × output (diffusers' Downsample2D with padding=0 pads right/bottom first, as in
  DDPM's CIFAR-10 U-Net): the shortcut pools the top-left stride × output window, dropping that padding."""
  ex = st.extra["shortcut"]
  h = x
  oh, ow = out.shape[1], out.shape[2]
  if "kernel" in ex:
    _, s, _ = _conv_geometry(module)
    h = h[:, ::s[0], ::s[1], :][:, :oh, :ow] if h.ndim == 4 else h
    h = h @ ex["kernel"]
  elif h.shape[1] > oh:
    fh, fw = h.shape[1] // oh, h.shape[2] // ow
    b, c = h.shape[0], h.shape[-1]
    h = h[:, :oh * fh, :ow * fw].reshape(b, oh, fh, ow, fw, c).mean(axis=(2, 4))
  elif h.shape[1] < oh:
    f = out.shape[1] // h.shape[1]
    h = jnp.repeat(jnp.repeat(h, f, axis=1), f, axis=2)
  return jnp.abs(ex["gamma"]) * h.astype(out.dtype)


def make_extended_interceptor(plan: Plan, qstate, t, *, capture: Optional[dict] = None,
                              patterns: Sequence[str] = ()):
  """One interceptor: hooked activation quantizers, the core interceptor for every other op, shortcuts and
  the capture of module outputs whose path fully matches one of `patterns` (into the dict `capture`)."""
  core = qapply.make_interceptor(plan, qstate, t)
  by_path = {op.path: op for op in plan.ops}
  rx = [re.compile(p) for p in patterns]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    st = qstate.get(path)
    kind = act_hook(st)
    op = by_path.get(path)
    if kind == "bin_act" and op is not None:
      out = _bin_act_call(next_fun, args, kwargs, context.module, op, st)
    elif kind == "taq" and op is not None:
      out = _taq_call(next_fun, args, kwargs, op, st, t)
    else:
      out = core(next_fun, args, kwargs, context)
    if st is not None and "shortcut" in st.extra and op is not None and op.info.kind == "conv":
      out = out + _shortcut(args[0], out, context.module, st)
    if capture is not None and rx and any(r.fullmatch(path) for r in rx):
      _record(capture, path, out)
    return out

  return interceptor


def _record(capture: dict, path: str, out):
  """Store a captured module output. A block returning a tuple (DiT blocks: (hidden, embedding); diffusers
  down blocks: (hidden, skips)) is recorded by its hidden states, its first element, which is the feature."""
  if isinstance(out, (tuple, list)):
    out = out[0]
  key, i = path, 1
  while key in capture:
    key, i = f"{path}#{i}", i + 1
  capture[key] = out


def qat_apply(model: nn.Module, plan: Plan, params: Any, qstate, x, t, cond=None, *, mode: str = "simulate",
              step=None, capture: Sequence[str] = (), adaround_hard: bool = True):
  """The extended quantized forward `model(x, t, cond)`. Returns the output, or (output, {path: feature})
  when `capture` names module-path regexes. mode: 'simulate' (or 'fp': float, same capture)."""
  if mode == "fp":
    return capture_apply(model, params, x, t, cond, capture)
  if mode != "simulate":
    raise ValueError(f"mode={mode!r} is not supported by the extended forward; accepted values: simulate, fp "
                     "(integer deploy storage is not defined for these quantizers)")
  qparams = extended_params(plan, params, qstate, t, step, adaround_hard=adaround_hard)
  feats = {} if capture else None
  with nn.intercept_methods(make_extended_interceptor(plan, qstate, t, capture=feats, patterns=capture)):
    out = model.apply({"params": qparams}, x, t, cond)
  return (out, feats) if capture else out


def capture_apply(model: nn.Module, params: Any, x, t, cond=None, capture: Sequence[str] = ()):
  """The float forward, optionally returning the outputs of the modules matching `capture`."""
  if not capture:
    return model.apply({"params": params}, x, t, cond)
  feats: dict = {}
  rx = [re.compile(p) for p in capture]

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      path = module_path(context.module)
      if any(r.fullmatch(path) for r in rx):
        _record(feats, path, out)
    return out

  with nn.intercept_methods(interceptor):
    out = model.apply({"params": params}, x, t, cond)
  return out, feats


@dataclasses.dataclass(frozen=True)
class QATModel(QModel):
  """A QModel whose quantized forward honours the extended quantizers of `OpState.extra`."""

  def apply(self, x, t, cond=None, *, mode: str = "simulate", step=None, capture: Sequence[str] = (), **kw):
    if mode == "fp":
      return capture_apply(self.model, self.fp_params, x, t, cond, capture)
    if mode == "deploy" and not has_hooks(self.qstate):
      return super().apply(x, t, cond, mode=mode, **kw)
    return qat_apply(self.model, self.plan, self.params, self.qstate, x, t, cond, mode=mode, step=step,
                     capture=capture)

  def denoiser(self, mode: str = "simulate", **kw):
    if mode == "fp" or not has_hooks(self.qstate):
      return super().denoiser(mode, **kw)
    model, plan, params, qstate = self.model, self.plan, self.params, self.qstate
    if mode != "simulate":
      raise ValueError(f"mode={mode!r} is not supported by the extended forward; accepted values: simulate, fp")
    return lambda x, t, cond=None: qat_apply(model, plan, params, qstate, x, t, cond)


def as_qat_model(qm: QModel) -> QATModel:
  """The same QModel, with the extended forward."""
  if isinstance(qm, QATModel):
    return qm
  return QATModel(**{f.name: getattr(qm, f.name) for f in dataclasses.fields(QModel)})
