"""BitsFusion: sensitivity-driven bit allocation under an average-bits budget, then two-stage distillation."""
import numpy as np

from dqjax.methods import _qat, bitsfusion
from tests.methods.qat_nets import run



def test_allocation_meets_the_budget_and_favours_sensitive_small_layers():
  sens = {"a": [10.0, 1.0, 0.1, 0.01], "b": [0.2, 0.1, 0.05, 0.01], "c": [5.0, 2.0, 0.5, 0.1]}
  sizes = {"a": 100, "b": 1000, "c": 100}
  bits = bitsfusion.allocate(sens, sizes, (1, 2, 3, 4), 2.0)
  avg = sum(bits[p] * sizes[p] for p in bits) / sum(sizes.values())
  assert avg <= 2.0
  assert bits["b"] == 1 and bits["a"] >= 3 and bits["c"] >= 3        # the big insensitive layer pays
  assert bitsfusion.allocate(sens, sizes, (1, 2, 3, 4), 4.0) == {"a": 4, "b": 4, "c": 4}


def test_bitsfusion_mixed_precision_recipe():
  # TinyNet's time embedding is 'time_dense': float, as the recipe keeps a U-Net's (and ~6 s less compilation).
  # Candidate widths 1 and 3: only a mix of them spends a 2-bit budget, and the sensitivity scan compiles one
  # quantizer per (weight shape, width), half as many as with 1–4.
  qm = run("bitsfusion", 2, 32, steps_stage1=4, steps_stage2=3, feature_patterns=("conv_mid",),
           keep_fp=rf"{_qat.TIME_EMBED}|time_dense", candidates=(1, 3))
  info = qm.meta["bitsfusion"]
  assert info["average_bits"] <= 2.0 + 1e-9
  used = {op.weight.effective_bits for op in qm.plan.ops if op.weight is not None}
  assert len(used) > 1                                                   # mixed precision
  assert all(not op.acts for op in qm.plan.ops)                          # weight-only at A32
  d = qm.meta["distill"]
  assert d["stage1"]["order"] == "random" and d["stage2"]["order"] == "forward"
  w = np.asarray(d["stage1_step_weights"])
  assert np.isclose(w.sum(), 1.0) and np.ptp(w) > 0                      # error-aware timestep sampling
