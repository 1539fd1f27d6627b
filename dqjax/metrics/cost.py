"""Model size and BOPs (bit operations): the cost columns of the survey's tables.

  size (MB) = (Σ_ops params · w_bits + other params · 32) / 8 / 10^6
  BOPs      = Σ_ops MACs · w_bits · a_bits            (one forward pass of one sample)

A float op counts 32 × 32 (FP = W32A32), so W8A8 divides the BOPs of every quantized op by 16 and W4A8 by
32; the survey's Stable Diffusion row (753 T → 47.05 T at W8A8 → 23.53 T at W4A8) follows exactly this
rule, and its FP size (3438 MB) is the U-Net's 859.5 M parameters at 4 bytes with 1 MB = 10^6 bytes. For a
product of two activations (attention's QK^T and AV) the second operand's bits play the role of w_bits
and its `params` are 0. This module does not know models: callers (the benchmark, from the quantization
plan) build the OpCost list.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

FP_BITS = 32


@dataclasses.dataclass(frozen=True)
class OpCost:
  """One matmul/conv of the network. macs: multiply-accumulates per forward pass of one sample;
  params: its weight elements (0 for activation×activation products); bits of its two operands."""
  name: str
  macs: int
  params: int
  w_bits: int = FP_BITS
  a_bits: int = FP_BITS

  def __post_init__(self):
    for field in ("macs", "params"):
      if getattr(self, field) < 0:
        raise ValueError(f"OpCost {self.name!r}: {field}={getattr(self, field)} must be ≥ 0")
    for field in ("w_bits", "a_bits"):
      if not 0 < getattr(self, field) <= 64:
        raise ValueError(f"OpCost {self.name!r}: {field}={getattr(self, field)} must lie in 1..64")


def model_size_mb(ops: Sequence[OpCost], other_params: int = 0, other_bits: int = FP_BITS) -> float:
  """Σ params · w_bits over `ops`, plus `other_params` (biases, norms, embeddings, FP kernels not listed)
  at `other_bits` (32), in MB = 10^6 bytes. Quantization scales are not counted (nor does the survey)."""
  if other_params < 0:
    raise ValueError(f"other_params={other_params} must be ≥ 0")
  bits = sum(o.params * o.w_bits for o in ops) + other_params * other_bits
  return bits / 8 / 1e6


def bops(ops: Sequence[OpCost]) -> float:
  """Σ MACs · w_bits · a_bits (the survey's BOPs; divide by 1e12 for its 'T' column)."""
  return float(sum(o.macs * o.w_bits * o.a_bits for o in ops))


def macs_of_dense(in_features: int, out_features: int, positions: int = 1) -> int:
  """MACs of a dense layer applied at `positions` positions (tokens, or pixels for a 1×1 conv)."""
  return int(in_features) * int(out_features) * int(positions)


def _pair(v: Union[int, Sequence[int]], name: str) -> tuple:
  t = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
  if len(t) != 2 or min(t) < 1:
    raise ValueError(f"{name}={v!r} must be a positive int or a pair of positive ints")
  return t


def macs_of_conv(kernel_hw: Union[int, Sequence[int]], in_channels: int, out_channels: int,
                 out_hw: Union[int, Sequence[int]], groups: int = 1) -> int:
  """MACs of a 2-D convolution: kh·kw·(C_in / groups)·C_out per output pixel, times H_out·W_out."""
  kh, kw = _pair(kernel_hw, "kernel_hw")
  oh, ow = _pair(out_hw, "out_hw")
  if groups < 1 or in_channels % groups or out_channels % groups:
    raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
  return kh * kw * (in_channels // groups) * out_channels * oh * ow
