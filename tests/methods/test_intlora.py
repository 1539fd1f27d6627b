"""IntLoRA: auxiliary-matrix separation, multiplicative LoRA whose merged weight stays on the integer grid."""
import jax.numpy as jnp
import numpy as np

from dqjax.methods import intlora
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from tests.methods.qat_nets import run


def test_intlora_merge_stays_on_the_integer_grid():
  qm = run("intlora", 8, 8, steps=8, lora_pattern="to_q|to_k|to_v", lr=1e-2)
  assert sorted(p for p, st in qm.qstate.items() if "intlora" in st.extra) == ["to_k", "to_q", "to_v"]
  ex = qm.qstate["to_q"].extra["intlora"]
  assert np.any(np.asarray(ex["b"]) != 0)                               # the adapter trained
  assert qm.meta["distill"]["trained_leaves"] == {"lora": 6}             # only A and B
  codes, step = intlora.merged_codes(qm, "to_q")
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes, np.round(codes))                 # integer × integer
  merged = qapply.get_kernel(hooks.extended_params(qm.plan, qm.params, qm.qstate), "to_q")
  np.testing.assert_allclose(np.asarray(merged), codes * np.asarray(step), rtol=1e-6, atol=1e-7)
  # adaptation-quantization separation: W_int − z quantizes W − R, and the start point (B = 0) is close to W
  w = np.asarray(qapply.get_kernel(qm.fp_params, "to_q"))
  start = {**ex, "b": jnp.zeros_like(ex["b"])}
  st = qm.qstate["to_q"]
  qs = {**qm.qstate, "to_q": st.replace(extra={**st.extra, "intlora": start})}
  w0 = np.asarray(qapply.get_kernel(hooks.extended_params(qm.plan, qm.params, qs), "to_q"))
  # (relative Frobenius error: the quantized multiplicative scale clips the few elements where W_int − z is
  # near 0, as in the paper's MUL variant, so a max-error bound would test the outliers, not the separation)
  rel = np.linalg.norm(w0 - w) / np.linalg.norm(w)
  assert rel < 0.15
  assert np.abs(np.asarray(ex["r"])).max() > 0
