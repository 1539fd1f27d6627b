"""Model size (MB) and BOPs of a quantized plan, as the survey's tables report them.

Size counts every parameter: quantized kernels at their weight bits, everything else (biases, norms,
embeddings, float kernels) at 32 bits; scales are not counted (the survey does not either). BOPs are
Σ MACs · b_w · b_a over one forward pass of one sample (two-operand matmuls: b_lhs · b_rhs); float ops
count 32 × 32. 1 MB = 10^6 bytes.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from dqjax.metrics import cost as cost_lib
from dqjax.transform.discover import discover
from dqjax.transform.rules import Plan

_CACHE: dict = {}


def _ops_per_sample(entry):
  key = entry.name
  if key not in _CACHE:
    _CACHE[key] = {o.path: o for o in discover(entry.model, {"params": entry.params}, *entry.example_args(1))}
  return _CACHE[key]


def op_costs(entry, plan: Optional[Plan]) -> list:
  out = []
  for path, info in _ops_per_sample(entry).items():
    op = plan[path] if plan is not None and path in plan else None
    w_bits = op.weight.effective_bits if op is not None and op.weight is not None else 32
    if info.kind == "matmul":
      specs = [op.act_spec(n) if op is not None else None for n in ("lhs", "rhs")]
      bits = [s.effective_bits if s is not None else 32 for s in specs]
      # A two-operand product has no weight: its "weight" operand is the second activation.
      w_bits, a_bits = bits[1], bits[0]
    else:
      spec = op.act_spec("input") if op is not None else None
      a_bits = spec.effective_bits if spec is not None else 32
    out.append(cost_lib.OpCost(name=path, macs=int(info.macs), params=info.weight_params, w_bits=w_bits,
                               a_bits=a_bits))
  return out


def row_costs(entry, plan: Optional[Plan]) -> dict:
  costs = op_costs(entry, plan)
  kernel_params = sum(c.params for c in costs)
  total_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(entry.params))
  return {"size_mb": float(cost_lib.model_size_mb(costs, total_params - kernel_params)),
          "bops_g": float(cost_lib.bops(costs)) / 1e9}
