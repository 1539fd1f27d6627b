"""Deploy mode: weights stored as integers / packed sub-byte codes / low-float bit patterns, with scales.

`to_deploy` turns a calibrated (simulate-mode) state into storage: the float kernels of quantized ops are
dropped from the parameter tree and replaced by `StoredTensor`s (int8, two int4 per byte, fp8/fp6/fp4 bit
patterns). At run time `restore_kernels` decodes them inside the compiled function (XLA fuses the decode),
and Dense/Conv ops whose weights and activations are both int8-representable run as int8×int8→int32
`dot_general` / `conv_general_dilated` with the scales applied in the epilogue.
Deploy and simulate read the same quantization state and agree within float rounding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dqjax.quant import ops as qops
from dqjax.quant import packing
from dqjax.transform import apply as qapply
from dqjax.transform.rules import OpPlan, Plan
from dqjax.transform.state import OpState, QState


def _codes(kernel, op: OpPlan, st: OpState):
  """Integer codes (or float grid values) of the fake-quantized kernel: exact, since it lies on the grid."""
  fq = qapply.fake_quant_kernel(kernel, op, st, adaround_hard=True)
  if op.input_split:
    c = op.input_split
    return (qops.quantize(fq[..., :c, :], st.weight, op.weight),
            qops.quantize(fq[..., c:, :], st.weight_split, op.weight))
  return (qops.quantize(fq, st.weight, op.weight),)


def to_deploy(plan: Plan, params: Any, qstate: QState) -> tuple[Any, dict]:
  """(params without the quantized kernels, {op path: tuple of StoredTensor}). Host-side, offline."""
  stored: dict[str, tuple] = {}
  drop = []
  for op in plan.ops:
    if op.weight is None:
      continue
    st = qstate[op.path]
    kernel = qapply.effective_kernel(qapply.get_kernel(params, op.path), st)
    stored[op.path] = tuple(packing.store(c, op.weight) for c in _codes(kernel, op, st))
    drop.append(f"{op.path}/kernel")
  flat = traverse_util.flatten_dict(params, sep="/")
  for key in drop:
    flat.pop(key)
  return traverse_util.unflatten_dict(flat, sep="/"), stored


def restore_kernels(plan: Plan, params: Any, deployed: dict, qstate: QState | None = None) -> Any:
  """Decode stored weights back into float kernels (inside jit) and put them into the parameter tree."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, parts in deployed["stored"].items() if "stored" in deployed else deployed.items():
    op = plan[path]
    qs = deployed["qstate"][path] if "qstate" in deployed else qstate[path]
    decoded = [qops.dequantize(packing.load(s), qp, op.weight)
               for s, qp in zip(parts, (qs.weight, qs.weight_split))]
    flat[f"{path}/kernel"] = decoded[0] if len(decoded) == 1 else jnp.concatenate(decoded, axis=-2)
  return traverse_util.unflatten_dict(flat, sep="/")


def kernel_bytes(plan: Plan, fp_params: Any, deployed: dict) -> dict:
  """Bytes of the quantized ops' kernels: as fp32, and deployed (codes, scales + zero points)."""
  stored, qstate = deployed["stored"], deployed["qstate"]
  fp32 = sum(int(qapply.get_kernel(fp_params, p).size) * 4 for p in stored)
  codes = sum(packing.nbytes(s) for parts in stored.values() for s in parts)
  scales = sum(int(leaf.size) * 4 for p in stored for q in (qstate[p].weight, qstate[p].weight_split)
               if q is not None for leaf in jax.tree_util.tree_leaves(q))
  return {"fp32": fp32, "codes": codes, "scales": scales}


def param_bytes(params: Any) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))


def deploy_state(plan: Plan, params: Any, qstate: QState) -> tuple[Any, dict]:
  """Convenience: (stripped params, `deployed` argument for `quantized_apply(mode='deploy')`)."""
  stripped, stored = to_deploy(plan, params, qstate)
  return stripped, {"stored": stored, "qstate": qstate}


def int8_codes(plan: Plan, deployed: dict) -> dict:
  """Decoded int8 weight codes of every op stored as integers (decode happens inside jit)."""
  out = {}
  stored = deployed["stored"] if "stored" in deployed else deployed
  for path, parts in stored.items():
    op = plan[path]
    if len(parts) == 1 and op.weight.format == "int":
      out[path] = packing.load(parts[0]).astype(jnp.int8)
  return out


# --- integer kernels -------------------------------------------------------------------------------------
def int8_capable(op: OpPlan, st: OpState, module: nn.Module) -> bool:
  """Whether an op can run as int8×int8→int32 on XLA: plain Dense/Conv, int ≤8-bit symmetric weights,
  static 8-bit-or-less int activations, no split/low-rank branch."""
  w, a = op.weight, op.act_spec("input")
  if w is None or a is None or a.dynamic or op.input_split or st.lowrank is not None:
    return False
  if w.format != "int" or not w.symmetric or w.granularity not in ("tensor", "channel") or w.axis not in (-1,):
    return False
  if a.format != "int" or a.granularity != "tensor":
    return False
  if type(module) is nn.Dense:
    return True
  if type(module) is nn.Conv:
    pad = module.padding
    return (isinstance(pad, str) and pad in ("SAME", "VALID")) and (module.feature_group_count == 1)
  return False


def int8_op(module: nn.Module, x: jax.Array, codes_w: jax.Array, w_scale: jax.Array, act_qp: qops.QParams,
            act_spec) -> jax.Array:
  """y = s_x·s_w·(X_int ⊛ W_int − z_x·(1 ⊛ W_int)) + b, with int32 accumulation."""
  xc = qops.quantize(x, act_qp, act_spec)
  if act_spec.symmetric and act_spec.signed:
    shift, zx = 0, 0
  else:
    shift = 128 if act_spec.qmax > 127 else 0
    zx = (0 if act_qp.zero_point is None else jnp.round(act_qp.zero_point)) - shift
  xi = (xc - shift).astype(jnp.int8)
  wi = codes_w.astype(jnp.int8)
  if type(module) is nn.Dense:
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    acc = jax.lax.dot_general(xi, wi, dims, preferred_element_type=jnp.int32)
    corr = jnp.sum(wi.astype(jnp.int32), axis=0)
  else:
    nsp = x.ndim - 2
    dn = jax.lax.conv_dimension_numbers(x.shape, wi.shape, ("NHWC", "HWIO", "NHWC") if nsp == 2 else None)
    strides = module.strides or (1,) * nsp
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    dil = module.kernel_dilation or 1
    dil = (dil,) * nsp if isinstance(dil, int) else tuple(dil)
    conv = lambda a: jax.lax.conv_general_dilated(a, wi, strides, module.padding, rhs_dilation=dil,
                                                  dimension_numbers=dn, preferred_element_type=jnp.int32)
    acc = conv(xi)
    corr = conv(jnp.ones_like(xi)) if not isinstance(zx, int) or zx != 0 else 0
  out = (acc - zx * corr).astype(jnp.float32) * act_qp.scale * w_scale.reshape(-1)
  bias = module.variables.get("params", {}).get("bias")
  return out + bias if bias is not None else out
