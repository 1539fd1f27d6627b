"""The quantization state: every array a quantized model needs besides its parameters.

`QState = {op_path: OpState}`: a plain dict pytree. Static choices (specs, which ops are quantized) live in
the `Plan`; everything here is an array, so a QState can be traced, differentiated (LSQ, AdaRound, LoRA),
vmapped over candidate configurations, sharded and checkpointed. A field that is None is simply absent
from the computation, so one structure fits PTQ, QAT, smoothing, rotations, low-rank branches and LoRA.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import struct

from dqjax.quant.ops import QParams
from dqjax.transform.rules import Plan


@struct.dataclass
class ActQuant:
  """Parameters of one activation operand's quantizer: a table with E >= 1 entries (leading axis) and the
  int32 [T] timestep → entry index (None when E == 1)."""
  qp: QParams
  index: Optional[jax.Array] = None


@struct.dataclass
class OpState:
  """Arrays of one op. Every field is optional.

  weight / weight_split: weight quantizer parameters (the second for the input channels after
    `OpPlan.input_split`, Q-Diffusion's shortcut split).
  rounding: AdaRound logits V (same shape as the kernel).
  acts: operand name → ActQuant ('input'; 'lhs'/'rhs' for matmuls; 'input_split' for the second part of a
    split input).
  smooth: per-input-channel divisor applied to the activation before quantization (SmoothQuant-style
    balancing; the kernel rows were multiplied by it, so the float function is unchanged).
  rotate: matrix applied to the activation's last axis before quantization (Hadamard / rotation; the kernel
    was pre-multiplied by its transpose).
  lowrank: (A [in, r], B [r, out]) float branch added to the output, computed on the (smoothed, rotated)
    float input (SVDQuant); the kernel holds the residual W - A@B.
  lora: (A [in, r], B [r, out]) adapter merged into the kernel before weight quantization (EfficientDM).
  extra: method-specific arrays keyed by name.
  """
  weight: Optional[QParams] = None
  weight_split: Optional[QParams] = None
  rounding: Optional[jax.Array] = None
  acts: dict = struct.field(default_factory=dict)
  smooth: Optional[jax.Array] = None
  rotate: Optional[jax.Array] = None
  lowrank: Optional[tuple] = None
  lora: Optional[tuple] = None
  extra: dict = struct.field(default_factory=dict)

  def replace_act(self, operand: str, act: ActQuant) -> "OpState":
    acts = dict(self.acts)
    acts[operand] = act
    return self.replace(acts=acts)


QState = dict  # {op path: OpState}


def empty_qstate(plan: Plan) -> QState:
  """An OpState for every quantized op, with nothing calibrated yet."""
  return {op.path: OpState() for op in plan.ops if op.quantized}


def update_op(qstate: QState, path: str, **changes) -> QState:
  """Pure update of one op's state."""
  new = dict(qstate)
  new[path] = qstate.get(path, OpState()).replace(**changes)
  return new
