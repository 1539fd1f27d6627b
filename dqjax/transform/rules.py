"""Rules map module paths to quantization settings; a plan is the rules resolved against a model's ops.

As in Qwix, a rule is a regex over the op's module path (full match) and the first matching rule wins.
The resolved `Plan` is static (hashable): it is a jit static argument and is saved as JSON in checkpoints.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional, Sequence

from dqjax.quant.spec import QuantSpec
from dqjax.transform.discover import OP_KINDS, OpInfo


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantization settings for the ops whose path fully matches `pattern`.

  Attributes:
    pattern: regex over '/'-joined module paths (e.g. 'time_embedding/.*', '.*attn1/(qk|sv)_matmul').
    weight: spec for the op's kernel (None: weights stay float).
    act: spec for the op's activation input(s) (None: activations stay float). For two-operand matmuls it
      applies to both operands unless `act_rhs` is given.
    act_rhs: spec for the second operand of a matmul (e.g. V in softmax·V), overriding `act`.
    act_lhs: spec for the first operand of a matmul (e.g. unsigned softmax probabilities), overriding `act`.
    keep_fp: the op is left entirely in float (same as weight=act=None, but explicit in the plan table).
    kinds: restrict the rule to these op kinds ('dense', 'conv', 'conv_transpose', 'einsum', 'matmul').
  """
  pattern: str = ".*"
  weight: Optional[QuantSpec] = None
  act: Optional[QuantSpec] = None
  act_lhs: Optional[QuantSpec] = None
  act_rhs: Optional[QuantSpec] = None
  keep_fp: bool = False
  kinds: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern={self.pattern!r} is not a valid regex: {e}") from None
    if self.kinds is not None:
      bad = [k for k in self.kinds if k not in OP_KINDS]
      if bad:
        raise ValueError(f"Rule.kinds has unknown kinds {bad}; accepted values: {', '.join(OP_KINDS)}")

  def matches(self, op: OpInfo) -> bool:
    return bool(re.fullmatch(self.pattern, op.path)) and (self.kinds is None or op.kind in self.kinds)


@dataclasses.dataclass(frozen=True)
class OpPlan:
  """The resolved settings of one op."""
  info: OpInfo
  weight: Optional[QuantSpec]
  acts: tuple[tuple[str, QuantSpec], ...]          # (operand name, spec) pairs for quantized operands
  rule_index: int = -1                              # which rule matched (-1: none)
  input_split: Optional[int] = None                 # Q-Diffusion shortcut split: channels of the first part

  @property
  def path(self) -> str:
    return self.info.path

  @property
  def quantized(self) -> bool:
    return self.weight is not None or bool(self.acts)

  def act_spec(self, operand: str) -> Optional[QuantSpec]:
    return dict(self.acts).get(operand)


@dataclasses.dataclass(frozen=True)
class Plan:
  """All ops of a model with their resolved quantization settings (static, hashable)."""
  ops: tuple[OpPlan, ...]

  def __getitem__(self, path: str) -> OpPlan:
    for op in self.ops:
      if op.path == path:
        return op
    raise KeyError(f"op path {path!r} is not in the plan; known paths: {', '.join(self.paths)}")

  def __contains__(self, path: str) -> bool:
    return any(op.path == path for op in self.ops)

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(op.path for op in self.ops)

  @property
  def quantized_ops(self) -> tuple[OpPlan, ...]:
    return tuple(op for op in self.ops if op.quantized)

  def replace_op(self, path: str, **changes) -> "Plan":
    """A new plan with one op's settings changed (e.g. a method sets `input_split` or a mixed-precision
    search changes `weight`)."""
    self[path]  # raises a clear KeyError
    return Plan(tuple(dataclasses.replace(op, **changes) if op.path == path else op for op in self.ops))

  def with_specs(self, path: str, weight=..., acts=...) -> "Plan":
    changes = {}
    if weight is not ...:
      changes["weight"] = weight
    if acts is not ...:
      changes["acts"] = tuple(acts.items()) if isinstance(acts, dict) else tuple(acts)
    return self.replace_op(path, **changes)

  def table(self) -> str:
    """The plan as a Markdown table: one row per op."""
    rows = ["| op | kind | weight shape | weight | activations | MACs |", "|---|---|---|---|---|---|"]
    for op in self.ops:
      w = op.weight.short() if op.weight else "fp"
      a = ", ".join(f"{n}: {s.short()}" for n, s in op.acts) if op.acts else "fp"
      if op.input_split:
        a += f" (split at {op.input_split})"
      shape = "×".join(map(str, op.info.weight_shape)) if op.info.weight_shape else "-"
      rows.append(f"| {op.path} | {op.info.kind} | {shape} | {w} | {a} | {op.info.macs:,} |")
    return "\n".join(rows)

  def to_json(self) -> dict:
    return {"ops": [_op_to_json(op) for op in self.ops]}

  @staticmethod
  def from_json(d: dict) -> "Plan":
    return Plan(tuple(_op_from_json(o) for o in d["ops"]))


def make_plan(ops: Sequence[OpInfo], rules: Sequence[Rule], *, warn_unused: bool = True) -> Plan:
  """Resolve rules against discovered ops (first match wins). A rule that matches nothing is reported with
  the list of op paths, since that is almost always a typo in the regex."""
  used = [False] * len(rules)
  planned = []
  for op in ops:
    chosen = None
    for i, rule in enumerate(rules):
      if rule.matches(op):
        chosen, used[i] = i, True
        break
    if chosen is None or rules[chosen].keep_fp:
      planned.append(OpPlan(op, None, (), chosen if chosen is not None else -1))
      continue
    rule = rules[chosen]
    weight = rule.weight if op.weight_shape is not None else None
    acts = []
    for name in op.operands:
      spec = rule.act
      if name == "lhs" and rule.act_lhs is not None:
        spec = rule.act_lhs
      if name == "rhs" and rule.act_rhs is not None:
        spec = rule.act_rhs
      if spec is not None:
        acts.append((name, spec))
    planned.append(OpPlan(op, weight, tuple(acts), chosen))
  if warn_unused:
    for i, (rule, u) in enumerate(zip(rules, used)):
      if not u:
        warnings.warn(f"quantization rule #{i} with pattern {rule.pattern!r} matched no op; op paths are: "
                      + ", ".join(op.path for op in ops), UserWarning, stacklevel=2)
  return Plan(tuple(planned))


# --- JSON (checkpoints store the plan next to the arrays) -------------------------------------------
def _spec_to_json(s: Optional[QuantSpec]):
  return None if s is None else dataclasses.asdict(s)


def _spec_from_json(d):
  return None if d is None else QuantSpec(**d)


def _op_to_json(op: OpPlan) -> dict:
  info = dataclasses.asdict(op.info)
  return {"info": info, "weight": _spec_to_json(op.weight),
          "acts": [[n, _spec_to_json(s)] for n, s in op.acts], "rule_index": op.rule_index,
          "input_split": op.input_split}


def _tuplify(x):
  return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _op_from_json(d: dict) -> OpPlan:
  info = {k: _tuplify(v) for k, v in d["info"].items()}
  return OpPlan(OpInfo(**info), _spec_from_json(d["weight"]),
                tuple((n, _spec_from_json(s)) for n, s in d["acts"]), d["rule_index"], d["input_split"])
