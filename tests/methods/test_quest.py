"""QuEST: timewise activation tables, then selective fine-tuning (time-embedding stage, attention stage)."""
import numpy as np

from dqjax.transform import apply as qapply
from tests.methods.qat_nets import ENV, run


def test_quest_selective_fine_tuning():
  qm = run("quest", 4, 4, steps_emb=4, steps_attn=6, emb_pattern="time_dense", attn_pattern="to_q|to_k|to_v",
           lr_emb=1e-3, lr_attn=1e-3, lr_act=1e-3, lr_emb_act=1e-3)
  changed = sorted(op.path for op in qm.plan.ops if op.info.weight_shape is not None and not np.array_equal(
      np.asarray(qapply.get_kernel(qm.params, op.path)), np.asarray(qapply.get_kernel(qm.fp_params, op.path))))
  assert changed == ["time_dense", "to_k", "to_q", "to_v"]            # only the selected layers' weights move
  st = qm.qstate["conv_mid"]
  assert st.acts["input"].qp.scale.shape[0] == ENV.sampler.num_steps  # timewise quantizers
  assert st.acts["input"].qp.zero_point is None                       # --a_sym
  assert qm.plan["sv_matmul"].act_spec("lhs").signed is False          # softmax probabilities: unsigned
  emb, attn = qm.meta["distill"]["emb"], qm.meta["distill"]["attn"]
  assert emb["order"] == "per_timestep" and emb["trained_leaves"] == {"emb_weights": 2, "emb_acts": 1}
  assert attn["trained_leaves"]["attn_weights"] == 6
  n_acts = sum(1 for op in qm.plan.ops for name, spec in op.acts)
  assert attn["trained_leaves"]["acts"] == n_acts - 1                 # every activation table but the embedding's
