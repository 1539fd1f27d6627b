"""Find every quantizable op of a plain Flax Linen model by tracing it once with interception.

Nothing about the model needs to change: the trace runs under `jax.eval_shape`, so it costs no FLOPs,
and the interceptor records each Dense / DenseGeneral / Conv / ConvTranspose / Einsum / MatMul call with its
module path, operand shapes, kernel shape and multiply-accumulate count (for BOPs).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax

OP_KINDS = ("dense", "conv", "conv_transpose", "einsum", "matmul")


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """One quantizable op as seen in a trace."""
  path: str                          # '/'-joined module path, e.g. 'down_blocks_0/resnets_0/conv1'
  kind: str                          # one of OP_KINDS
  operands: tuple[str, ...]          # names of activation operands: ('input',) or ('lhs', 'rhs')
  input_shapes: tuple[tuple[int, ...], ...]
  output_shape: tuple[int, ...]
  weight_shape: Optional[tuple[int, ...]]
  macs: int                          # multiply-accumulates of one call with the traced batch
  calls: int = 1                     # how many times the op ran in one forward pass
  has_bias: bool = False

  @property
  def weight_params(self) -> int:
    return int(math.prod(self.weight_shape)) if self.weight_shape else 0


def op_kind(module: nn.Module) -> Optional[str]:
  """The op kind of a module, or None when it is not quantizable."""
  if isinstance(module, nn.ConvTranspose):
    return "conv_transpose"
  if isinstance(module, nn.Conv):
    return "conv"
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return "dense"
  if isinstance(module, nn.Einsum):
    return "einsum"
  if type(module).__name__ == "MatMul" and hasattr(module, "equation"):
    return "matmul"
  return None


def module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def operand_names(kind: str) -> tuple[str, ...]:
  return ("lhs", "rhs") if kind == "matmul" else ("input",)


def _einsum_macs(equation: str, shapes) -> int:
  eq = equation.replace(" ", "")
  ins, out = eq.split("->")
  sizes: dict[str, int] = {}
  for term, shape in zip(ins.split(","), shapes):
    term = term.replace("...", "")
    for letter, size in zip(term[-len(shape):] if term else "", shape[-len(term):] if term else ()):
      sizes[letter] = size
  letters = set("".join(ins.split(",")).replace(".", ""))
  return int(math.prod(sizes.get(ch, 1) for ch in letters))


def _macs(kind: str, module: nn.Module, in_shapes, out_shape, w_shape) -> int:
  out_elems = math.prod(out_shape)
  if kind == "dense":
    # contracted size = kernel elements / output features.
    n_out = math.prod(w_shape[-1:]) if isinstance(module, nn.Dense) else math.prod(
        w_shape[len(w_shape) - len(_as_tuple(module.features)):])
    return int(out_elems * (math.prod(w_shape) // max(n_out, 1)))
  if kind == "conv":
    # HWIO kernel: I is already in_features / feature_group_count.
    return int(out_elems * math.prod(w_shape[:-1]))
  if kind == "conv_transpose":
    # every input position scatters a kernel window: macs = input positions * kernel elements.
    return int(math.prod(in_shapes[0][:-1]) * math.prod(w_shape))
  if kind == "einsum":
    return _einsum_macs(module.equation, (in_shapes[0], w_shape))
  if kind == "matmul":
    return _einsum_macs(module.equation, in_shapes[:2])
  return 0


def _as_tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def discover(model: nn.Module, variables: Any, *args, method=None, **kwargs) -> list[OpInfo]:
  """Trace `model.apply(variables, *args, **kwargs)` abstractly and list its quantizable ops in call order."""
  found: dict[str, OpInfo] = {}

  def interceptor(next_fun, iargs, ikwargs, context):
    out = next_fun(*iargs, **ikwargs)
    kind = op_kind(context.module) if context.method_name == "__call__" else None
    if kind is None:
      return out
    path = module_path(context.module)
    n_act = 2 if kind == "matmul" else 1
    in_shapes = tuple(tuple(a.shape) for a in iargs[:n_act])
    params = context.module.variables.get("params", {})
    w_shape = tuple(params["kernel"].shape) if "kernel" in params else None
    out_shape = tuple(getattr(out, "shape", ()))
    if path in found:
      found[path] = dataclasses.replace(found[path], calls=found[path].calls + 1,
                                        macs=found[path].macs + _macs(kind, context.module, in_shapes,
                                                                      out_shape, w_shape))
    else:
      found[path] = OpInfo(path=path, kind=kind, operands=operand_names(kind), input_shapes=in_shapes,
                           output_shape=out_shape, weight_shape=w_shape,
                           macs=_macs(kind, context.module, in_shapes, out_shape, w_shape),
                           has_bias="bias" in params)
    return out

  def run(v, *a, **kw):
    with nn.intercept_methods(interceptor):
      if method is None:
        return model.apply(v, *a, **kw)
      return model.apply(v, *a, method=method, **kw)

  jax.eval_shape(run, variables, *args, **kwargs)
  return list(found.values())


def match_paths(pattern: str, paths) -> list[str]:
  rx = re.compile(pattern)
  return [p for p in paths if rx.fullmatch(p)]
