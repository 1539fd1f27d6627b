"""Deploy storage: sub-byte packing round trips, float bit patterns against ml_dtypes, StoredTensor sizes."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqjax.quant import ops as qops
from dqjax.quant import packing
from dqjax.quant.spec import FLOAT_FORMATS, QuantSpec

UNPACK = jax.jit(packing.unpack_bits, static_argnames=("bits", "length", "signed"))
LOAD = jax.jit(packing.load)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.booleans(), st.sampled_from([(), (3,), (2, 2)]), st.integers(1, 19),
       st.integers(0, 2 ** 32 - 1))
def test_pack_unpack_round_trip(bits, signed, lead, length, seed):
  lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
  codes = np.random.default_rng(seed).integers(lo, hi + 1, size=lead + (length,))
  codes[..., 0] = lo                         # both ends of the range always present
  codes[..., -1] = hi
  packed = packing.pack_bits(codes, bits, signed)
  assert packed.dtype == np.uint8 and packed.shape == lead + (-(-length // (8 // bits)),)
  out = UNPACK(jnp.asarray(packed), bits=bits, length=length, signed=signed)
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(out), codes)


def test_int4_helpers_and_known_layout():
  codes = np.array([[1, -2, 7], [-8, 0, 3]])
  packed = packing.pack_int4(codes)          # signedness inferred from the negative codes
  # little-endian nibbles: element 0 in the low 4 bits; -2 = 0b1110; odd length padded with 0
  np.testing.assert_array_equal(packed, np.array([[0xE1, 0x07], [0x08, 0x03]], np.uint8))
  np.testing.assert_array_equal(np.asarray(packing.unpack_int4(packed, 3, signed=True)), codes)
  np.testing.assert_array_equal(np.asarray(packing.unpack_int4(packing.pack_int4([15, 0, 9]), 3, signed=False)),
                                [15, 0, 9])


def test_pack_errors_name_the_problem():
  with pytest.raises(ValueError, match="bits=3 cannot be packed; accepted values: 1, 2, 4"):
    packing.pack_bits([1, 2], 3)
  with pytest.raises(ValueError, match=r"do not fit 4-bit signed storage; accepted range \[-8, 7\]"):
    packing.pack_bits([-9, 0], 4, signed=True)
  with pytest.raises(ValueError, match=r"do not fit 2-bit unsigned storage; accepted range \[0, 3\]"):
    packing.pack_bits([4], 2, signed=False)
  with pytest.raises(ValueError, match="must be integers"):
    packing.pack_bits(np.array([0.5]), 4)
  with pytest.raises(ValueError, match="fmt='fp7' is unknown; accepted values: fp8_e4m3"):
    packing.decode_float(jnp.zeros(2, jnp.uint8), "fp7")
  with pytest.raises(ValueError, match="not on the fp4_e2m1 grid"):
    packing.encode_float(np.array([0.7]), "fp4_e2m1")


@pytest.mark.parametrize("fmt", list(FLOAT_FORMATS))
def test_decode_float_equals_ml_dtypes_for_every_code(fmt):
  nbits = QuantSpec(fmt).effective_bits
  codes = np.arange(2 ** nbits, dtype=np.uint8)          # all 256 / 64 / 16 bit patterns
  ref = codes.view(packing.ML_DTYPES[fmt]).astype(np.float32)
  got = np.asarray(jax.jit(packing.decode_float, static_argnums=1)(jnp.asarray(codes), fmt))
  np.testing.assert_array_equal(got, ref)                # nan == nan, inf == inf, signs of zero kept
  assert np.array_equal(np.signbit(got), np.signbit(ref))
  # encode is the inverse on every finite code (−0 and +0 both survive)
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(packing.encode_float(ref[finite], fmt), codes[finite])


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize(x, spec):
  if spec.format == "binary":
    qp = qops.binary_params(x, spec, tuple(range(x.ndim)))
  else:
    qp = qops.params_from_range(jnp.min(x) * 0.8, jnp.max(x) * 0.8, spec)   # some clipping too
  return qp, qops.quantize(x, qp, spec), qops.fake_quant(x, qp, spec)


DEQ = jax.jit(qops.dequantize, static_argnames=("spec",))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([
    QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8, signed=False),
    QuantSpec(bits=6), QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=3),
    QuantSpec(bits=2), QuantSpec(bits=2, symmetric=False), QuantSpec(bits=1, signed=False),
    QuantSpec("ternary"), QuantSpec("binary")] + [QuantSpec(f) for f in FLOAT_FORMATS]),
    st.sampled_from([(5,), (4, 7), (2, 3, 8), ()]), st.integers(0, 2 ** 32 - 1))
def test_store_load_round_trip(spec, shape, seed):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3)
  qp, codes, fq = _quantize(x, spec=spec)
  stored = packing.store(codes, spec)
  assert stored.shape == tuple(shape)
  out = LOAD(stored)
  assert out.shape == tuple(shape)
  np.testing.assert_array_equal(np.asarray(out).astype(np.float32), np.asarray(codes).astype(np.float32))
  # deploy path: dequantize(load(store(quantize(x)))) == fake_quant(x)
  np.testing.assert_array_equal(np.asarray(DEQ(out, qp, spec=spec)), np.asarray(fq))


def test_stored_sizes():
  codes8 = np.random.default_rng(0).integers(-8, 8, size=(16, 64))
  s8 = packing.store(codes8, QuantSpec(bits=8))
  s4 = packing.store(codes8, QuantSpec(bits=4))
  s2 = packing.store(np.clip(codes8, -2, 1), QuantSpec(bits=2))
  s1 = packing.store(np.where(codes8 >= 0, 1, -1), QuantSpec("binary"))
  assert (s8.kind, s4.kind, s2.kind, s1.kind) == ("int8", "int4", "int2", "int1")
  assert packing.nbytes(s8) == 16 * 64
  assert packing.nbytes(s4) * 2 == packing.nbytes(s8)    # int4 bytes are half the int8 bytes
  assert packing.nbytes(s2) * 4 == packing.nbytes(s8)
  assert packing.nbytes(s1) * 8 == packing.nbytes(s8)
  f4 = packing.store(np.zeros((16, 64), np.float32), QuantSpec("fp4_e2m1"))
  f6 = packing.store(np.zeros((16, 64), np.float32), QuantSpec("fp6_e2m3"))
  assert packing.nbytes(f4) * 2 == packing.nbytes(f6) == 16 * 64
  # odd last axis: padded to whole bytes per row
  assert packing.nbytes(packing.store(np.zeros((3, 5), np.int64), QuantSpec(bits=4))) == 3 * 3


def test_store_rejects_codes_off_the_grid():
  with pytest.raises(ValueError, match=r"outside the grid of int4 sym/t \[-8, 7\]"):
    packing.store(np.array([8, 0]), QuantSpec(bits=4))
  with pytest.raises(ValueError, match="binary codes must be -1 or \\+1"):
    packing.store(np.array([0, 1]), QuantSpec("binary"))
  with pytest.raises(ValueError, match="not on the fp8_e4m3 grid"):
    packing.store(np.array([449.0]), QuantSpec("fp8_e4m3"))


def test_stored_tensor_is_a_pytree_with_static_metadata():
  stored = packing.store(np.array([[1, -2, 3]]), QuantSpec(bits=4))
  leaves, treedef = jax.tree_util.tree_flatten(stored)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (rebuilt.kind, rebuilt.shape, rebuilt.signed) == ("int4", (1, 3), True)
  # decoded inside a jitted consumer
  w = jax.jit(lambda s, a: packing.load(s).astype(jnp.float32) * a)(stored, 0.5)
  np.testing.assert_array_equal(np.asarray(w), [[0.5, -1.0, 1.5]])
  with pytest.raises(ValueError, match="StoredTensor.kind='int3' is unknown"):
    packing.load(stored.replace(kind="int3"))


def test_ml_dtypes_mapping_is_complete():
  assert set(packing.ML_DTYPES) == set(FLOAT_FORMATS)
  assert packing.ML_DTYPES["fp6_e2m3"] is ml_dtypes.float6_e2m3fn
