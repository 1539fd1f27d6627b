"""Building blocks shared by the method recipes: the standard rule sets and the calibration passes."""
from __future__ import annotations

from typing import Optional, Sequence

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.quant import tables
from dqjax.quant.spec import QuantSpec
from dqjax.transform.rules import Rule

# First and last layers of the zoo's model families (U-Net conv_in/conv_out, DiT patch embed/final proj).
FIRST_LAST = r"(conv_in|conv_out|pos_embed/proj|proj_out_2|proj_out)"
SOFTMAX_OPERAND = r".*sv_matmul"   # lhs of softmax·V holds the softmax probabilities (non-negative)


def standard_rules(w_bits: int, a_bits: int, *, weight_granularity: str = "channel",
                   group_size: Optional[int] = None, act_symmetric: bool = False, act_dynamic: bool = False,
                   quantize_matmuls: bool = True, first_last_bits: Optional[int] = None,
                   keep_fp: Sequence[str] = (), weight_format: str = "int",
                   act_format: str = "int") -> list[Rule]:
  """The rules most papers start from: per-channel weights and per-tensor activations at the given bits.

  Activations at 16/32 bits stay float. Attention matmuls quantize both operands at `a_bits` (softmax
  probabilities with an unsigned grid). `first_last_bits` quantizes the first/last layers at that width
  (None: same as the rest). `keep_fp` lists path regexes left in float.
  """
  def wspec(bits):
    if weight_format != "int":
      return QuantSpec(weight_format, granularity="group" if group_size else weight_granularity,
                       axis=-2 if group_size else -1, group_size=group_size)
    if group_size:
      return QuantSpec("int", bits, symmetric=True, granularity="group", axis=-2, group_size=group_size)
    return QuantSpec("int", bits, symmetric=True, granularity=weight_granularity, axis=-1)

  def aspec(bits, **kw):
    if bits >= 16:
      return None
    if act_format != "int":
      return QuantSpec(act_format, granularity="token" if act_dynamic else "tensor")
    return QuantSpec("int", bits, symmetric=kw.get("symmetric", act_symmetric),
                     signed=kw.get("signed", True), granularity="token" if act_dynamic else "tensor")

  rules = [Rule(pattern=p, keep_fp=True) for p in keep_fp]
  if first_last_bits is not None:
    rules.append(Rule(pattern=FIRST_LAST, weight=wspec(first_last_bits), act=aspec(first_last_bits),
                      kinds=("dense", "conv", "conv_transpose")))
  if quantize_matmuls:
    probs = None if a_bits >= 16 else QuantSpec("int", a_bits, symmetric=True, signed=False,
                                                 granularity="token" if act_dynamic else "tensor")
    rules.append(Rule(pattern=SOFTMAX_OPERAND, act=aspec(a_bits), act_lhs=probs, kinds=("matmul",)))
    rules.append(Rule(pattern=".*", act=aspec(a_bits), kinds=("matmul",)))
  else:
    rules.append(Rule(pattern=".*", keep_fp=True, kinds=("matmul",)))
  rules.append(Rule(pattern=".*", weight=wspec(w_bits), act=aspec(a_bits)))
  return rules


def calibrate_weights_pass(method: str = "minmax", **search_kw):
  """Pass: weight quantizer parameters from the kernels (no data needed)."""
  def run(qm, data: CalibData):
    return calibrate.calibrate_weights(qm, method, **search_kw)
  return run


def calibrate_activations_pass(method: str = "minmax", *, table: tables.TableSpec = tables.TableSpec(),
                               batch_size: Optional[int] = None, quantize: bool = False, **kw):
  """Pass: activation quantizer tables from observing the model on the calibration data."""
  def run(qm, data: CalibData):
    return calibrate.calibrate_activations(qm, data, method, table=table, batch_size=batch_size,
                                           quantize=quantize, **kw)
  return run


def config_get(config, key, default):
  """Read an optional field of an ml_collections config (or dict, or None)."""
  if config is None:
    return default
  try:
    return config[key] if key in config else default
  except TypeError:
    return getattr(config, key, default)
