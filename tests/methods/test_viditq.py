"""ViDiT-Q: per-token dynamic activations, static balance + rotation, metric-decoupled mixed precision."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqjax.methods import recipe
from dqjax.methods.viditq import allocate, metric_groups
from tests.methods.dit_ptq_nets import calib, fp_out, tiny_dit


def test_decoupled_allocation_ranks_each_group_by_its_own_metric():
  sens = {"a/attn2/to_k": {"eps": 1e-6, "guidance": 5.0}, "a/attn2/to_v": {"eps": 9.0, "guidance": 1.0},
          "b/attn1/to_q": {"eps": 0.5, "guidance": 9.0}, "b/ff/net_2": {"eps": 2.0, "guidance": 0.1},
          "b/attn1/to_k": {"eps": 0.1, "guidance": 0.1}}
  groups = metric_groups(list(sens))
  assert groups == {"guidance": ["a/attn2/to_k", "a/attn2/to_v"],
                    "eps": ["b/attn1/to_q", "b/ff/net_2", "b/attn1/to_k"]}
  # cross-attention is ranked by alignment (to_k), the rest by quality (net_2): one pick per group
  assert allocate(sens, groups, 0.33) == ["a/attn2/to_k", "b/ff/net_2"]      # ⌈0.33·2⌉ = ⌈0.33·3⌉ = 1


def test_viditq_balance_rotation_and_mixed_precision():
  model, params, ex = tiny_dit()
  data = calib()
  cfg = ml_collections.ConfigDict(dict(mp_fraction=0.34, mp_samples_per_step=8, num_alphas=5))
  qm = recipe.build("viditq", cfg)(model, params, ex, data, w_bits=4, a_bits=8, model_family="dit")
  for p in ("transformer_blocks_0/attn1/to_q", "transformer_blocks_0/ff/net_2"):
    st = qm.qstate[p]
    assert st.smooth is not None and st.rotate is not None
    np.testing.assert_allclose(st.rotate @ st.rotate.T, np.eye(st.rotate.shape[0]), atol=1e-5)
    a = qm.plan[p].act_spec("input")
    assert a.granularity == "token" and a.dynamic and a.symmetric
  # q/k/v read one tensor: one shared balance and rotation
  np.testing.assert_array_equal(qm.qstate["transformer_blocks_0/attn1/to_q"].rotate,
                                qm.qstate["transformer_blocks_0/attn1/to_v"].rotate)
  assert not qm.plan["transformer_blocks_0/norm1/linear"].quantized             # remain_fp: adaLN
  mp = qm.meta["viditq_mp"]
  ranked = sorted(mp["sensitivity"], key=lambda p: -mp["sensitivity"][p]["eps"])
  assert mp["high"] == ranked[:3]                                              # ⌈0.34 · 6⌉ most sensitive
  for p, op in ((op.path, op) for op in qm.plan.quantized_ops):
    assert op.weight.bits == (8 if p in mp["high"] else 4)
  out = qm.apply(data.xs[1], jnp.full((8,), data.ts[1]), data.conds[1])
  ref = fp_out(model, params, data, 1)
  assert float(jnp.mean((out - ref) ** 2)) < 0.05 * float(jnp.mean(ref ** 2))
