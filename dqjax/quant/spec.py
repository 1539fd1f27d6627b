"""Quantization specs: what a quantizer does, as a frozen, hashable value.

A spec says *how* a tensor is quantized (number format, bits, symmetry, granularity). The numbers that a
calibration finds (scale, zero point, rounding variables) live separately in a pytree (`QParams`), so a
spec can be a static argument of a jitted function while its parameters are traced arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

INT = "int"
BINARY = "binary"
TERNARY = "ternary"
# name -> (exponent bits, mantissa bits, max finite value); all "fn" variants: no inf, no negative zero issues.
FLOAT_FORMATS = {
    "fp8_e4m3": (4, 3, 448.0),
    "fp8_e5m2": (5, 2, 57344.0),
    "fp6_e3m2": (3, 2, 28.0),
    "fp6_e2m3": (2, 3, 7.5),
    "fp4_e2m1": (2, 1, 6.0),
}
FORMATS = (INT, BINARY, TERNARY) + tuple(FLOAT_FORMATS)
GRANULARITIES = ("tensor", "channel", "group", "token")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    format: 'int', 'binary', 'ternary' or a float format ('fp8_e4m3', 'fp8_e5m2', 'fp6_e3m2', 'fp6_e2m3',
      'fp4_e2m1').
    bits: integer bit width 1..8 (ignored and fixed for binary=1, ternary=2 and float formats).
    symmetric: zero point fixed at 0 (int). Asymmetric int uses an integer zero point.
    signed: for symmetric int, a signed grid [-2^(b-1), 2^(b-1)-1]; unsigned [0, 2^b-1] suits softmax
      outputs and other non-negative tensors.
    narrow_range: symmetric signed grid without its most negative level ([-(2^(b-1)-1), 2^(b-1)-1]).
    granularity: 'tensor' (one scale), 'channel' (one per index of `axis`), 'group' (one per `group_size`
      consecutive elements along `axis`, separately for every index of the other axes except `reduce_axes`),
      'token' (one scale per row, reduced over `axis`; always dynamic).
    axis: the channel axis ('channel'), the grouped axis ('group') or the reduced feature axis ('token').
    group_size: elements per group for 'group'.
    dynamic: parameters are computed from the tensor itself at run time (absmax / min-max over the
      granularity's reduction) instead of being calibrated; 'token' implies it.
  """

  format: str = INT
  bits: int = 8
  symmetric: bool = True
  signed: bool = True
  narrow_range: bool = False
  granularity: str = "tensor"
  axis: int = -1
  group_size: Optional[int] = None
  dynamic: bool = False

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"QuantSpec.format={self.format!r} is unknown; accepted values: {', '.join(FORMATS)}")
    if self.format == INT and not (isinstance(self.bits, (int, np.integer)) and 1 <= self.bits <= 8):
      raise ValueError(f"QuantSpec.bits={self.bits!r} is out of range; accepted values: integers 1..8")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"QuantSpec.granularity={self.granularity!r} is unknown; accepted values: "
                       f"{', '.join(GRANULARITIES)}")
    if self.granularity == "group":
      if not (isinstance(self.group_size, (int, np.integer)) and self.group_size >= 1):
        raise ValueError(f"QuantSpec.group_size={self.group_size!r} must be a positive integer when "
                         "granularity='group'")
    elif self.group_size is not None:
      raise ValueError("QuantSpec.group_size is only accepted with granularity='group'")
    if self.is_float and not self.symmetric:
      raise ValueError(f"QuantSpec.symmetric=False is not supported for float format {self.format!r}; "
                       "accepted: symmetric=True")
    if self.granularity == "token" and not self.dynamic:
      object.__setattr__(self, "dynamic", True)
    if self.format == INT and self.bits == 1 and self.symmetric and self.signed and not self.narrow_range:
      # A 1-bit signed grid is {-1, 0}: useless. Point users to the binary format.
      raise ValueError("QuantSpec.bits=1 with a signed symmetric int grid has levels {-1, 0}; "
                       "use format='binary' (levels {-a, +a}) or signed=False")

  # --- derived properties -------------------------------------------------------------------------
  @property
  def is_float(self) -> bool:
    return self.format in FLOAT_FORMATS

  @property
  def effective_bits(self) -> int:
    """Bits per stored element (used for model size and BOPs)."""
    if self.format == BINARY:
      return 1
    if self.format == TERNARY:
      return 2
    if self.is_float:
      e, m, _ = FLOAT_FORMATS[self.format]
      return 1 + e + m
    return int(self.bits)

  @property
  def qmin(self) -> int:
    if self.format == TERNARY:
      return -1
    if self.format == BINARY:
      return -1
    if self.symmetric and self.signed:
      return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
    return 0

  @property
  def qmax(self) -> int:
    if self.format in (TERNARY, BINARY):
      return 1
    if self.symmetric and self.signed:
      return 2 ** (self.bits - 1) - 1
    return 2 ** self.bits - 1

  @property
  def max_abs_level(self) -> float:
    """Largest representable magnitude on the unscaled grid (used to turn a range into a scale)."""
    if self.is_float:
      return FLOAT_FORMATS[self.format][2]
    return float(max(abs(self.qmin), self.qmax))

  @property
  def is_dynamic(self) -> bool:
    return self.dynamic

  def replace(self, **changes) -> "QuantSpec":
    return dataclasses.replace(self, **changes)

  def short(self) -> str:
    """A compact human-readable label, e.g. 'int8 sym/ch', 'fp4_e2m1/g32'."""
    name = f"int{self.bits}" if self.format == INT else self.format
    sym = "" if self.format != INT else (" sym" if self.symmetric else " asym")
    if self.format == INT and self.symmetric and not self.signed:
      sym = " unsigned"
    gran = {"tensor": "t", "channel": f"ch{self.axis}", "group": f"g{self.group_size}", "token": "tok"}
    dyn = " dyn" if self.dynamic and self.granularity != "token" else ""
    return f"{name}{sym}/{gran[self.granularity]}{dyn}"


# --- convenience constructors --------------------------------------------------------------------
def int_weight(bits: int = 8, *, per_channel: bool = True, symmetric: bool = True, group_size=None,
               axis: int = -1) -> QuantSpec:
  """Weights: per-output-channel (the last kernel axis for Dense/Conv in Flax) unless grouped."""
  if group_size is not None:
    return QuantSpec(INT, bits, symmetric=symmetric, granularity="group", axis=-2 if axis == -1 else axis,
                     group_size=group_size)
  return QuantSpec(INT, bits, symmetric=symmetric, granularity="channel" if per_channel else "tensor",
                   axis=axis)


def int_act(bits: int = 8, *, symmetric: bool = False, dynamic: bool = False) -> QuantSpec:
  """Activations: per-tensor static (the survey's baseline) or per-token dynamic."""
  return QuantSpec(INT, bits, symmetric=symmetric, granularity="token" if dynamic else "tensor")


def parse_bits(setting: str) -> tuple[int, int]:
  """'W4A8' -> (4, 8). 'W8A32' or 'W4A16' means activations kept in float."""
  s = str(setting).strip().upper()
  import re
  m = re.fullmatch(r"W(\d+)A(\d+)", s)
  if not m:
    raise ValueError(f"bit setting {setting!r} is malformed; accepted form 'W<bits>A<bits>', e.g. 'W4A8'")
  w, a = int(m.group(1)), int(m.group(2))
  for field, v in (("weight bits", w), ("activation bits", a)):
    if not (1 <= v <= 8 or v in (16, 32)):
      raise ValueError(f"{field}={v} in {setting!r} is out of range; accepted values: 1..8, or 16/32 (float)")
  return w, a
