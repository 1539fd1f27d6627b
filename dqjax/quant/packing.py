"""Deploy-mode storage of quantized weights: 8-bit codes as int8/uint8, sub-byte codes packed into bytes
(int4 two per byte, int2 four, int1 eight), and low-float bit patterns (fp8 / fp6 / fp4 through ml_dtypes;
fp4 packed two per byte).

Encoding runs on the host, offline, with numpy; decoding is jnp, jit-safe, so that XLA fuses it into the
consumer. XLA keeps sub-byte dtypes one per byte on CPU and cannot cast to fp6, so dqjax packs itself
(shifts and masks) and decodes floats with a lookup table over all bit patterns of the format.

Packing is along the last axis: element j of a row goes to byte j // per, bits (j % per)·bits upwards
(little-endian inside the byte). An odd/ragged last axis is zero-padded; its original length is needed to
unpack (StoredTensor records the shape).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from dqjax.quant.spec import BINARY, FLOAT_FORMATS, QuantSpec

ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
PACK_BITS = (1, 2, 4)
KINDS = ("int8", "int4", "int2", "int1", "float")


def float_bits(fmt: str) -> int:
  """Bits of one code of a float format (8, 6 or 4)."""
  _check_fmt(fmt)
  e, m, _ = FLOAT_FORMATS[fmt]
  return 1 + e + m


def _check_fmt(fmt: str):
  if fmt not in ML_DTYPES:
    raise ValueError(f"float format fmt={fmt!r} is unknown; accepted values: {', '.join(ML_DTYPES)}")


def _check_bits(bits: int):
  if bits not in PACK_BITS:
    raise ValueError(f"bits={bits!r} cannot be packed; accepted values: {', '.join(map(str, PACK_BITS))}")


def _as_int_codes(codes, what: str = "codes") -> np.ndarray:
  a = np.asarray(codes)
  if not np.issubdtype(a.dtype, np.integer):
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise ValueError(f"{what} must be integers (got non-integral values of dtype {a.dtype})")
  return a.astype(np.int64)


# --- sub-byte integers ------------------------------------------------------------------------------
def pack_bits(codes, bits: int, signed: Optional[bool] = None) -> np.ndarray:
  """Pack integer codes of `bits` ∈ {1, 2, 4} into uint8 along the last axis (zero-padded).

  signed: whether codes are two's-complement in [−2^(b−1), 2^(b−1)−1] (True) or in [0, 2^b−1] (False);
  None infers it from the sign of the smallest code. Codes out of range raise (they would wrap).
  Returns uint8 [..., ceil(n / (8 // bits))].
  """
  _check_bits(bits)
  a = _as_int_codes(codes)
  if a.ndim == 0:
    a = a.reshape(1)
  if signed is None:
    signed = bool(a.size and a.min() < 0)
  lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
  if a.size and (a.min() < lo or a.max() > hi):
    raise ValueError(f"codes in [{a.min()}, {a.max()}] do not fit {bits}-bit "
                     f"{'signed' if signed else 'unsigned'} storage; accepted range [{lo}, {hi}]")
  per = 8 // bits
  n = a.shape[-1]
  pad = (-n) % per
  u = (a & ((1 << bits) - 1)).astype(np.uint8)
  if pad:
    u = np.concatenate([u, np.zeros(u.shape[:-1] + (pad,), np.uint8)], axis=-1)
  u = u.reshape(u.shape[:-1] + ((n + pad) // per, per))
  out = np.zeros(u.shape[:-1], np.uint8)
  for i in range(per):
    out |= (u[..., i] << np.uint8(i * bits)).astype(np.uint8)
  return out


def unpack_bits(packed, bits: int, length: int, signed: bool) -> jax.Array:
  """Inverse of `pack_bits` (jnp, jit-safe; `bits`, `length`, `signed` static): int8 [..., length]."""
  _check_bits(bits)
  per = 8 // bits
  mask = (1 << bits) - 1
  p = jnp.asarray(packed).astype(jnp.uint8)
  if p.shape[-1] * per < length:
    raise ValueError(f"length={length} exceeds the {p.shape[-1] * per} codes held by {p.shape[-1]} bytes")
  shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
  vals = (p[..., None] >> shifts) & jnp.uint8(mask)                 # [..., bytes, per]
  vals = vals.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :length].astype(jnp.int8)
  if signed:
    sign = 1 << (bits - 1)
    vals = jnp.where(vals >= sign, vals - (1 << bits), vals).astype(jnp.int8)
  return vals


def pack_int4(codes, signed: Optional[bool] = None) -> np.ndarray:
  """Two 4-bit codes per byte along the last axis (see `pack_bits`)."""
  return pack_bits(codes, 4, signed)


def unpack_int4(packed, length: int, signed: bool = True) -> jax.Array:
  """int8 codes [..., length] from `pack_int4` output (jnp, jit-safe)."""
  return unpack_bits(packed, 4, length, signed)


# --- low floats -------------------------------------------------------------------------------------
def encode_float(grid_values, fmt: str) -> np.ndarray:
  """Bit patterns (uint8, low `float_bits(fmt)` bits) of values already on the format's grid.

  Values off the grid (or beyond the format's max) raise instead of being silently rounded: they mean the
  caller skipped quantization.
  """
  _check_fmt(fmt)
  v = np.asarray(grid_values, np.float32)
  enc = v.astype(ML_DTYPES[fmt])
  back = enc.astype(np.float32)
  bad = ~((back == v) | (np.isnan(back) & np.isnan(v)))
  if bad.any():
    i = np.flatnonzero(bad)[0]
    raise ValueError(f"encode_float: value {v.reshape(-1)[i]!r} is not on the {fmt} grid (nearest "
                     f"{back.reshape(-1)[i]!r}); quantize first (ops.quantize / minifloat_round)")
  return enc.view(np.uint8)


@functools.lru_cache(maxsize=None)
def float_table(fmt: str) -> np.ndarray:
  """Value of every bit pattern of `fmt` (float32 [2^bits], NaN/inf kept where the format has them)."""
  _check_fmt(fmt)
  codes = np.arange(2 ** float_bits(fmt), dtype=np.uint8)
  return codes.view(ML_DTYPES[fmt]).astype(np.float32)


def decode_float(codes, fmt: str) -> jax.Array:
  """float32 values of bit patterns (jnp gather from `float_table`; works for fp6, which XLA cannot cast)."""
  mask = 2 ** float_bits(fmt) - 1
  idx = jnp.asarray(codes).astype(jnp.int32) & mask
  return jnp.asarray(float_table(fmt))[idx]


# --- one stored tensor -----------------------------------------------------------------------------------
@struct.dataclass
class StoredTensor:
  """Compact codes of one tensor: `data` (a pytree leaf) and static decoding information.

  kind: 'int8' (int8 / uint8, one code per byte), 'int4' | 'int2' | 'int1' (packed along the last axis),
    or 'float' (ml_dtypes bit patterns; fp4 packed two per byte).
  fmt: the float format for 'float'; 'binary' for ±1 codes stored as one bit; '' otherwise.
  shape: the original shape; signed: two's-complement codes.
  """
  data: jax.Array
  kind: str = struct.field(pytree_node=False, default="int8")
  fmt: str = struct.field(pytree_node=False, default="")
  shape: tuple = struct.field(pytree_node=False, default=())
  signed: bool = struct.field(pytree_node=False, default=True)


def _container_bits(effective_bits: int) -> int:
  return 8 if effective_bits > 4 else (4 if effective_bits > 2 else effective_bits)


def store(codes, spec: QuantSpec) -> StoredTensor:
  """Codes from `ops.quantize` (integer codes, or float grid values for float formats) → StoredTensor.

  Host-side (numpy). Codes must lie on the spec's grid: [qmin, qmax] for int/ternary, {−1, +1} for binary.
  """
  arr = np.asarray(codes)
  shape = tuple(int(d) for d in arr.shape)
  flat = arr.reshape(1) if arr.ndim == 0 else arr
  if spec.is_float:
    pat = encode_float(flat, spec.format)
    if float_bits(spec.format) == 4:
      return StoredTensor(jnp.asarray(pack_bits(pat, 4, signed=False)), "float", spec.format, shape, False)
    return StoredTensor(jnp.asarray(pat), "float", spec.format, shape, False)
  a = _as_int_codes(flat, f"codes of {spec.short()}")
  if spec.format == BINARY:
    if a.size and not np.all(np.abs(a) == 1):
      raise ValueError(f"binary codes must be -1 or +1 (got values in [{a.min()}, {a.max()}])")
    return StoredTensor(jnp.asarray(pack_bits(a > 0, 1, signed=False)), "int1", "binary", shape, False)
  if a.size and (a.min() < spec.qmin or a.max() > spec.qmax):
    raise ValueError(f"codes in [{a.min()}, {a.max()}] are outside the grid of {spec.short()} "
                     f"[{spec.qmin}, {spec.qmax}]")
  signed = spec.qmin < 0
  bits = _container_bits(spec.effective_bits)
  if bits == 8:
    return StoredTensor(jnp.asarray(a.astype(np.int8 if signed else np.uint8)), "int8", "", shape, signed)
  return StoredTensor(jnp.asarray(pack_bits(a, bits, signed)), f"int{bits}", "", shape, signed)


def load(s: StoredTensor) -> jax.Array:
  """Decode (jnp, jit-safe): int8 codes (uint8 for unsigned 8-bit), ±1 int8 for binary, float32 grid
  values for float formats; always in the original shape."""
  n = s.shape[-1] if s.shape else 1
  if s.kind == "float":
    pat = unpack_bits(s.data, 4, n, False) if float_bits(s.fmt) == 4 else s.data
    return decode_float(pat, s.fmt).reshape(s.shape)
  if s.kind == "int8":
    return jnp.asarray(s.data).reshape(s.shape)
  if s.kind not in KINDS:
    raise ValueError(f"StoredTensor.kind={s.kind!r} is unknown; accepted values: {', '.join(KINDS)}")
  bits = int(s.kind[3:])
  codes = unpack_bits(s.data, bits, n, s.signed)
  if s.fmt == "binary":
    codes = codes * 2 - 1
  return codes.astype(jnp.int8).reshape(s.shape)


def nbytes(s: StoredTensor) -> int:
  """Bytes of the stored codes (scales and zero points are counted by the caller)."""
  return int(s.data.size) * int(s.data.dtype.itemsize)
