"""EfficientDM: layer selection, QALoRA merged before quantization, per-step activation LSQ, distillation."""
import numpy as np

from dqjax.calib import distill
from dqjax.transform import apply as qapply
from tests.methods.qat_nets import ENV, run


def test_efficientdm_qalora_per_step_tables_and_distillation():
  qm0 = run("efficientdm", 4, 4, steps=0, lora_rank=2, merge_lora=False)
  plan = qm0.plan
  assert plan["conv_in"].weight.bits == 8 and plan["conv_out"].weight.bits == 8      # first / last: 8-bit
  assert plan["conv_mid"].weight.bits == 4 and not plan["conv_mid"].weight.symmetric
  assert not plan["qk_matmul"].quantized and not plan["sv_matmul"].quantized          # matmuls stay float
  loras = sorted(p for p, st in qm0.qstate.items() if st.lora is not None)
  assert loras == ["conv_mid", "time_dense", "to_k", "to_q", "to_v"]                  # no LoRA on 8-bit layers
  assert not np.any(np.asarray(qm0.qstate["conv_mid"].lora[1]))                       # B = 0: starts at PTQ
  steps = ENV.sampler.num_steps
  assert qm0.qstate["conv_mid"].acts["input"].qp.scale.shape[0] == steps              # one (Δ_t, z_t) per step

  qm = run("efficientdm", 4, 4, steps=16, lora_rank=2, lora_lr_divisor=10.0)
  assert all(st.lora is None for st in qm.qstate.values())                            # merged for deployment
  k_fp, k_q = qapply.get_kernel(qm.fp_params, "conv_mid"), qapply.get_kernel(qm.params, "conv_mid")
  assert not np.allclose(np.asarray(k_fp), np.asarray(k_q))                           # W + B·A merged
  np.testing.assert_array_equal(np.asarray(qapply.get_kernel(qm.params, "conv_in")),
                                np.asarray(qapply.get_kernel(qm.fp_params, "conv_in")))
  t0 = np.asarray(qm0.qstate["conv_mid"].acts["input"].qp.scale)
  t1 = np.asarray(qm.qstate["conv_mid"].acts["input"].qp.scale)
  assert t1.shape == t0.shape and not np.allclose(t0, t1)                              # temporal LSQ trained
  info = qm.meta["distill"]
  assert info["trained_leaves"]["lora"] == 10 and info["order"] == "trajectory"
  pool = distill.make_pool(qm0, 8, 11)
  assert distill.stepwise_error(qm, pool).mean() < distill.stepwise_error(qm0, pool).mean()
