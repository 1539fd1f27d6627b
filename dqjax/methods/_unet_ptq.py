"""Pieces shared by the U-Net PTQ recipes (Q-Diffusion, PTQ4DM, EDA-DM, TFMQ-DM, TDQ, APQ-DM).

- `rules_from_config`: the standard rules plus the per-paper choices the research notes insist on making
  explicit (weight/activation symmetry, layers kept in float, layers held at 8 bits, activations left in
  float behind a quantized weight, attention matmuls, softmax bits).
- `skip_concat_splits` / `split_shortcuts_pass`: Q-Diffusion's shortcut splitting, found from the model
  itself (the skip `Concat` that feeds each up-block ResBlock's 1×1 `conv_shortcut`).
- `with_data`: run passes on a calibration set the method builds itself.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax

from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.quant.spec import QuantSpec
from dqjax.transform import param_transforms
from dqjax.transform.discover import module_path, op_kind
from dqjax.transform.rules import Rule

LAYER_KINDS = ("dense", "conv", "conv_transpose")
SHORTCUT = r".*conv_shortcut"
SKIP_CONCAT = r"(.+/)?skip_concat(_\d+)?"


def _tuple(v) -> tuple:
  if v is None:
    return ()
  if isinstance(v, str):
    return (v,)
  return tuple(v)


def rules_from_config(config, *, weight_symmetric: bool = True, act_symmetric: bool = False,
                      keep_fp: Sequence[str] = (), eight_bit: Sequence[str] = (), fp_acts: Sequence[str] = (),
                      quantize_matmuls: bool = True, softmax_bits=None) -> Callable:
  """rules(w_bits, a_bits, model_family) for a U-Net paper; every keyword is overridable by the config field
  of the same name.

  keep_fp: path regexes left entirely in float. eight_bit: layers quantized at W8A8 whatever the setting
  (PTQ4DM/EDA-DM's first/last layers). fp_acts: layers whose weights are quantized but whose input is not
  (TFMQ-DM). softmax_bits: bits of the softmax probabilities (unsigned), None = the activation bits.
  """
  get = lambda k, d: common.config_get(config, k, d)
  w_sym = bool(get("weight_symmetric", weight_symmetric))
  a_sym = bool(get("act_symmetric", act_symmetric))
  keep = _tuple(get("keep_fp", keep_fp))
  eight = _tuple(get("eight_bit", eight_bit))
  no_act = _tuple(get("fp_acts", fp_acts))
  matmuls = bool(get("quantize_matmuls", quantize_matmuls))
  sm_bits = get("softmax_bits", softmax_bits)
  if sm_bits is not None and not 1 <= int(sm_bits) <= 8:
    raise ValueError(f"config field softmax_bits={sm_bits!r} is out of range; accepted: 1..8 or None")

  def wspec(bits):
    return QuantSpec("int", bits, symmetric=w_sym, granularity="channel", axis=-1)

  def aspec(bits):
    return None if bits >= 16 else QuantSpec("int", bits, symmetric=a_sym)

  def rules(w_bits: int, a_bits: int, model_family: str = "unet") -> list[Rule]:
    out = [Rule(p, keep_fp=True) for p in keep]
    out += [Rule(p, weight=wspec(8), act=aspec(8) if a_bits < 16 else None, kinds=LAYER_KINDS) for p in eight]
    out += [Rule(p, weight=wspec(w_bits), act=None, kinds=LAYER_KINDS) for p in no_act]
    for r in common.standard_rules(w_bits, a_bits, act_symmetric=a_sym, quantize_matmuls=matmuls):
      if r.weight is not None:
        r = dataclasses.replace(r, weight=wspec(w_bits))
      if r.act_lhs is not None and sm_bits is not None:
        r = dataclasses.replace(r, act_lhs=r.act_lhs.replace(bits=int(sm_bits)))
      out.append(r)
    return out

  return rules


# --- Q-Diffusion's shortcut split -----------------------------------------------------------------------
def example_inputs(data: CalibData, n: int = 1):
  """(x, t, cond) of the first `n` calibration samples: enough to trace the model."""
  x, t, c = data.xs[0][:n], jax.numpy.full((n,), data.ts[0]), None
  if data.conds is not None:
    c = jax.tree_util.tree_map(lambda a: a[0][:n], data.conds)
  return x, t, c


def skip_concat_splits(qm, data: CalibData, *, conv_pattern: str = SHORTCUT,
                       concat_pattern: str = SKIP_CONCAT) -> dict[str, int]:
  """{conv path: channels of the concat's first operand} for every quantized conv matching `conv_pattern`
  whose input is the output of the most recent skip concatenation (same channel count)."""
  events = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      path = module_path(context.module)
      if re.fullmatch(concat_pattern, path) and len(args) >= 2:
        events.append(("concat", path, int(args[0].shape[-1]), int(out.shape[-1])))
      elif op_kind(context.module) is not None and re.fullmatch(conv_pattern, path):
        events.append(("op", path, int(args[0].shape[-1]), 0))
    return out

  def run(p, *a):
    with nn.intercept_methods(interceptor):
      return qm.model.apply({"params": p}, *a)

  jax.eval_shape(run, qm.params, *example_inputs(data))
  splits, last = {}, None
  for kind, path, ch, total in events:
    if kind == "concat":
      last = (ch, total)
    elif last is not None and ch == last[1] and path in qm.plan and qm.plan[path].quantized:
      splits[path] = last[0]
  return splits


def split_shortcuts_pass(enabled: bool = True, **kw):
  """Pass: quantize the two halves of every skip-concat shortcut conv separately (before calibration)."""
  def run(qm, data: CalibData):
    if not enabled:
      return qm
    splits = skip_concat_splits(qm, data, **kw)
    for path, ch in splits.items():
      qm = param_transforms.split_input(qm, path, ch)
    return qm.replace(meta={**qm.meta, "shortcut_splits": dict(splits)})
  return run


def with_data(make: Callable, *passes) -> Callable:
  """Pass: build the method's own calibration set `make(qm, data)`, then run `passes` on it."""
  def run(qm, data: CalibData):
    d = make(qm, data)
    for p in passes:
      qm = p(qm, d)
    return qm
  return run
