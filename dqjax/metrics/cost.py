"""Model size and BOPs (bit operations), the cost columns of the survey's tables."""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class OpCost:
  name: str
  macs: int          # multiply-accumulates of one forward pass of one sample
  params: int        # weight elements of the op (0 for activation-activation products)
  w_bits: int = 32
  a_bits: int = 32


def model_size_mb(ops: Sequence[OpCost], other_params: int = 0, other_bits: int = 32) -> float:
  """Σ params · w_bits + other params at `other_bits`, in MB (10^6 bytes)."""
  bits = sum(o.params * o.w_bits for o in ops) + other_params * other_bits
  return bits / 8 / 1e6


def bops(ops: Sequence[OpCost]) -> float:
  """Σ MACs · b_w · b_a."""
  return float(sum(o.macs * o.w_bits * o.a_bits for o in ops))


def macs_of_dense(in_features: int, out_features: int, positions: int = 1) -> int:
  return in_features * out_features * positions


def macs_of_conv(kernel_hw: tuple, in_channels: int, out_channels: int, out_hw: tuple, groups: int = 1) -> int:
  return kernel_hw[0] * kernel_hw[1] * (in_channels // groups) * out_channels * out_hw[0] * out_hw[1]
