"""Deploy-mode storage of quantized weights: int8, sub-byte codes packed into bytes (int4 two per byte,
int2 four, int1 eight), and low-float bit patterns (fp8 / fp6 / fp4 via ml_dtypes; fp4 packed two per
byte). Encoding runs on the host, offline; decoding is jnp (inside jit, fused by XLA).

XLA stores sub-byte dtypes one per byte on CPU and cannot cast to fp6, so dqjax packs and decodes itself:
sub-byte ints with shifts, floats with a lookup table over all bit patterns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from dqjax.quant.spec import BINARY, QuantSpec

ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


@struct.dataclass
class StoredTensor:
  """Stored codes: `data` (uint8 / int8 array) plus static decoding information."""
  data: jax.Array
  kind: str = struct.field(pytree_node=False, default="int8")   # int8 | packed | float
  bits: int = struct.field(pytree_node=False, default=8)
  signed: bool = struct.field(pytree_node=False, default=True)
  fmt: str = struct.field(pytree_node=False, default="")
  shape: tuple = struct.field(pytree_node=False, default=())


# --- sub-byte integers ------------------------------------------------------------------------------
def pack_bits(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
  """Pack integer codes of `bits` ∈ {1, 2, 4} into uint8 along the flattened tensor (padded)."""
  if bits not in (1, 2, 4):
    raise ValueError(f"pack_bits(bits={bits}): accepted values 1, 2, 4")
  per = 8 // bits
  flat = np.asarray(codes).reshape(-1).astype(np.int64)
  u = (flat & ((1 << bits) - 1)).astype(np.uint8) if signed else flat.astype(np.uint8)
  pad = (-len(u)) % per
  u = np.concatenate([u, np.zeros(pad, np.uint8)]).reshape(-1, per)
  out = np.zeros(u.shape[0], np.uint8)
  for i in range(per):
    out |= (u[:, i] << (i * bits)).astype(np.uint8)
  return out


def unpack_bits(packed: jax.Array, bits: int, signed: bool, shape) -> jax.Array:
  """Inverse of pack_bits (jnp, jit-safe): int8 codes of the original shape."""
  per = 8 // bits
  mask = (1 << bits) - 1
  p = jnp.asarray(packed, jnp.uint8)
  parts = [((p >> (i * bits)) & mask).astype(jnp.int32) for i in range(per)]
  vals = jnp.stack(parts, axis=-1).reshape(-1)[: int(np.prod(shape))]
  if signed:
    vals = jnp.where(vals >= (1 << (bits - 1)), vals - (1 << bits), vals)
  return vals.astype(jnp.int8).reshape(shape)


def pack_int4(codes: np.ndarray, signed: bool = True) -> np.ndarray:
  return pack_bits(codes, 4, signed)


def unpack_int4(packed, shape, signed: bool = True):
  return unpack_bits(packed, 4, signed, shape)


# --- low floats -------------------------------------------------------------------------------------
def encode_float(values: np.ndarray, fmt: str) -> np.ndarray:
  """Bit patterns (uint8) of values already on the format's grid."""
  if fmt not in ML_DTYPES:
    raise ValueError(f"float format {fmt!r} is unknown; accepted values: {', '.join(ML_DTYPES)}")
  return np.asarray(values, np.float32).astype(ML_DTYPES[fmt]).view(np.uint8)


@functools.lru_cache(maxsize=None)
def _lut(fmt: str) -> np.ndarray:
  dt = ML_DTYPES[fmt]
  nbits = 8 if fmt.startswith("fp8") else (6 if fmt.startswith("fp6") else 4)
  codes = np.arange(2 ** nbits, dtype=np.uint8)
  vals = codes.view(dt).astype(np.float32)
  return np.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)


def decode_float(codes: jax.Array, fmt: str) -> jax.Array:
  return jnp.asarray(_lut(fmt))[jnp.asarray(codes, jnp.int32)]


# --- one stored tensor -----------------------------------------------------------------------------------
def store(codes, spec: QuantSpec) -> StoredTensor:
  """Codes from `ops.quantize` (ints, or float grid values) → compact storage."""
  arr = np.asarray(codes)
  shape = tuple(arr.shape)
  if spec.is_float:
    pat = encode_float(arr, spec.format)
    if spec.effective_bits == 4:
      return StoredTensor(jnp.asarray(pack_bits(pat, 4, False)), "float_packed", 4, False, spec.format, shape)
    return StoredTensor(jnp.asarray(pat), "float", spec.effective_bits, False, spec.format, shape)
  bits = spec.effective_bits
  signed = bool(arr.min() < 0) or spec.format == BINARY
  if spec.format == BINARY:
    arr = (arr > 0).astype(np.int64)     # {-1, +1} → {0, 1}
    return StoredTensor(jnp.asarray(pack_bits(arr, 1, False)), "binary", 1, False, "", shape)
  if bits > 4:
    return StoredTensor(jnp.asarray(arr.astype(np.int8 if signed else np.uint8)), "int8", bits, signed, "", shape)
  store_bits = 4 if bits > 2 else bits
  return StoredTensor(jnp.asarray(pack_bits(arr, store_bits, signed)), "packed", store_bits, signed, "", shape)


def load(s: StoredTensor) -> jax.Array:
  """Decode storage: int8 codes for int formats, float grid values for float formats."""
  if s.kind == "int8":
    return s.data.astype(jnp.int8) if s.signed else s.data.astype(jnp.int32)
  if s.kind == "packed":
    return unpack_bits(s.data, s.bits, s.signed, s.shape)
  if s.kind == "binary":
    return unpack_bits(s.data, 1, False, s.shape).astype(jnp.int8) * 2 - 1
  if s.kind == "float_packed":
    return decode_float(unpack_bits(s.data, 4, False, s.shape).astype(jnp.uint8), s.fmt)
  return decode_float(s.data, s.fmt).reshape(s.shape)


def nbytes(s: StoredTensor) -> int:
  return int(s.data.size) * int(s.data.dtype.itemsize)
