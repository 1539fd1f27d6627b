"""A-QDiT: group-wise weights and activations, activation ranges from a single (auto-chosen) sampling step."""
import jax
import ml_collections
import numpy as np

from dqjax.calib import calibrate
from dqjax.methods import recipe
from tests.methods.dit_ptq_nets import calib, tiny_dit


def test_single_step_calibration_with_groups():
  model, params, ex = tiny_dit()
  data = calib()
  cfg = ml_collections.ConfigDict(dict(group_size=8, calib_step="auto"))
  qm = recipe.build("aqdit", cfg)(model, params, ex, data, w_bits=4, a_bits=8, model_family="dit")
  info = qm.meta["aqdit"]
  assert info["step"] == int(np.argmin(info["errors"])) and len(info["errors"]) == data.num_steps
  op = qm.plan["transformer_blocks_0/attn1/to_q"]
  assert op.weight.granularity == "group" and op.weight.group_size == 8
  assert op.act_spec("input").granularity == "group" and not op.act_spec("input").dynamic
  assert qm.plan["pos_embed/proj"].weight.group_size == 4           # gcd with the 4 latent channels
  # the static ranges are exactly those of the chosen step alone (that step repeated: the data keeps its
  # shape, so the compiled calibration pass is reused)
  one = calibrate.calibrate_activations(qm, data.select_steps([info["step"]] * data.num_steps), "minmax")
  for path in ("transformer_blocks_0/attn1/to_q", "transformer_blocks_0/ff/net_2",
               "transformer_blocks_0/attn1/qk_matmul"):
    for name, aq in qm.qstate[path].acts.items():
      assert aq.index is None
      np.testing.assert_allclose(aq.qp.scale, one.qstate[path].acts[name].qp.scale, rtol=1e-6)
  # a fixed step (first = noisiest) gives other ranges
  fixed = recipe.build("aqdit", ml_collections.ConfigDict(dict(group_size=8, calib_step=0.0)))(
      model, params, ex, data, w_bits=4, a_bits=8, model_family="dit")
  assert fixed.meta["aqdit"]["step"] == 0
  leaves = lambda q: jax.tree_util.tree_leaves(q.qstate["transformer_blocks_0/ff/net_2"].acts)
  if info["step"] != 0:
    assert not all(np.allclose(a, b) for a, b in zip(leaves(qm), leaves(fixed)))
