"""QuantSpec: validation messages name the bad field, derived grids, hashability (static jit argument)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.quant import ops as qops
from dqjax.quant import spec as qspec
from dqjax.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5])
def test_bits_out_of_range_names_field(bits):
  with pytest.raises(ValueError, match=r"QuantSpec\.bits=.*accepted values: integers 1\.\.8"):
    QuantSpec(bits=bits)


def test_unknown_format_names_field_and_accepted_values():
  with pytest.raises(ValueError, match=r"QuantSpec\.format='int3'.*accepted values:.*fp8_e4m3"):
    QuantSpec(format="int3")


def test_unknown_granularity_names_field():
  with pytest.raises(ValueError, match=r"QuantSpec\.granularity='row'.*accepted values: tensor, channel"):
    QuantSpec(granularity="row")


def test_group_needs_positive_group_size():
  with pytest.raises(ValueError, match=r"QuantSpec\.group_size=None"):
    QuantSpec(granularity="group")
  with pytest.raises(ValueError, match=r"QuantSpec\.group_size=0"):
    QuantSpec(granularity="group", group_size=0)
  with pytest.raises(ValueError, match=r"QuantSpec\.group_size is only accepted"):
    QuantSpec(granularity="channel", group_size=4)


def test_group_size_not_dividing_axis_names_field():
  spec = QuantSpec(granularity="group", group_size=3, axis=-1)
  with pytest.raises(ValueError, match=r"QuantSpec\.group_size=3 does not divide axis -1 of size 8"):
    qops.fake_quant(jnp.ones((2, 8)), None, spec.replace(dynamic=True))


def test_axis_out_of_rank_names_field():
  with pytest.raises(ValueError, match=r"QuantSpec\.axis=3"):
    qops.group_view(jnp.ones((2, 8)), QuantSpec(granularity="group", group_size=2, axis=3))


def test_float_formats_are_symmetric_only():
  with pytest.raises(ValueError, match=r"QuantSpec\.symmetric=False.*fp8_e4m3"):
    QuantSpec(format="fp8_e4m3", symmetric=False)


def test_signed_one_bit_points_to_binary():
  with pytest.raises(ValueError, match="format='binary'"):
    QuantSpec(bits=1)
  assert (QuantSpec(bits=1, signed=False).qmin, QuantSpec(bits=1, signed=False).qmax) == (0, 1)


@pytest.mark.parametrize("kw, qmin, qmax, eff", [
    (dict(bits=8), -128, 127, 8),
    (dict(bits=8, narrow_range=True), -127, 127, 8),
    (dict(bits=4, symmetric=False), 0, 15, 4),
    (dict(bits=8, signed=False), 0, 255, 8),
    (dict(bits=2), -2, 1, 2),
    (dict(format="ternary"), -1, 1, 2),
    (dict(format="binary"), -1, 1, 1),
])
def test_int_grids(kw, qmin, qmax, eff):
  s = QuantSpec(**kw)
  assert (s.qmin, s.qmax, s.effective_bits) == (qmin, qmax, eff)


@pytest.mark.parametrize("fmt, bits, mx", [("fp8_e4m3", 8, 448.0), ("fp8_e5m2", 8, 57344.0),
                                           ("fp6_e3m2", 6, 28.0), ("fp6_e2m3", 6, 7.5), ("fp4_e2m1", 4, 6.0)])
def test_float_format_table_matches_ml_dtypes(fmt, bits, mx):
  import ml_dtypes
  from dqjax.quant import packing
  s = QuantSpec(format=fmt)
  assert s.effective_bits == bits and s.max_abs_level == mx
  assert float(ml_dtypes.finfo(packing.ML_DTYPES[fmt]).max) == mx


def test_token_granularity_is_dynamic_and_spec_is_a_static_jit_argument():
  s = QuantSpec(granularity="token")
  assert s.dynamic and s.is_dynamic
  assert hash(s) == hash(QuantSpec(granularity="token", dynamic=True))
  f = jax.jit(qops.fake_quant, static_argnames=("spec",))
  x = jnp.arange(12.0).reshape(3, 4) - 5.0
  np.testing.assert_array_equal(np.asarray(f(x, None, spec=s)), np.asarray(qops.fake_quant(x, None, s)))


def test_short_labels_and_constructors():
  assert QuantSpec(bits=8).short() == "int8 sym/t"
  assert qspec.int_weight(4, group_size=32).short() == "int4 sym/g32"
  assert qspec.int_weight(4, group_size=32).axis == -2
  assert qspec.int_act(8, dynamic=True).granularity == "token"
  assert QuantSpec(format="fp4_e2m1", granularity="group", group_size=32).short() == "fp4_e2m1/g32"


@pytest.mark.parametrize("setting, expected", [("W4A8", (4, 8)), ("w8a32", (8, 32))])
def test_parse_bits(setting, expected):
  assert qspec.parse_bits(setting) == expected


@pytest.mark.parametrize("bad, field", [("W4", "malformed"), ("W9A8", "weight bits=9"), ("W4A12", "activation bits=12")])
def test_parse_bits_errors(bad, field):
  with pytest.raises(ValueError, match=field):
    qspec.parse_bits(bad)
