"""BiDM: W1A1 with XNOR weights, learnable-threshold binary activations, K maps, SPD distillation."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import bidm
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from tests.methods.qat_nets import run


class _Conv:   # the geometry the K map reads from the intercepted module
  kernel_size, strides, padding = (3, 3), (1, 1), "SAME"


def test_bidm_binary_structure_and_space_patched_distillation(monkeypatch):
  # TinyNet's time embedding 'time_dense' float, as BiDM keeps a U-Net's (a smaller training step to compile)
  qm = run("bidm", 1, 1, steps=5, feature_patterns=("conv_mid",), lr_binarizer=1e-2,
           keep_fp=f"{bidm.KEEP_FP}|time_dense")
  plan, st = qm.plan, qm.qstate["conv_mid"]
  assert not plan["conv_in"].quantized and not plan["conv_out"].quantized and not plan["qk_matmul"].quantized
  assert plan["conv_mid"].weight.format == "binary" and plan["conv_mid"].act_spec("input").format == "binary"
  # jitted, returning one kernel: XLA drops the other ops' quantizers (eager, each op's ops compile one by one)
  w = jax.jit(lambda p, q: qapply.get_kernel(hooks.extended_params(plan, p, q), "conv_mid"))(qm.params, qm.qstate)
  for c in range(3):
    assert np.unique(np.abs(np.asarray(w[..., c]))).size == 1             # ±mean|W| per output channel
  tau = np.asarray(st.extra["bin_act"]["tau"])
  assert tau.shape == (8,) and np.any(tau != 0)                          # thresholds learned
  # activations: sign(x + τ) times the XNOR map K of the conv window (jitted here and below: eagerly, every
  # primitive of the binarizer, the K map and the gradient compiles on its own)
  monkeypatch.setattr(hooks, "op_kind", lambda m: "conv")
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 8), np.float32)   # numpy: jax.random.normal compiles

  def bin_act(v):
    return hooks._bin_act_call(lambda a: a, (v,), {}, _Conv(), plan["conv_mid"], st)

  out, k = jax.jit(lambda v: (bin_act(v), hooks.lowbit.xnor_scale_map(v, (3, 3), (1, 1), "SAME")))(x)
  signs = np.asarray(out) / np.asarray(k)
  np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.sign(signs), np.where(x + tau >= 0, 1.0, -1.0))
  # ApproxSign backward, checked where no K map multiplies the output (K depends on x and carries its own
  # gradient, as in XNOR-Net): a dense op
  monkeypatch.setattr(hooks, "op_kind", lambda m: "dense")
  g = jax.jit(jax.grad(lambda v: jnp.sum(bin_act(v))))(x)
  inside = np.abs(x + tau) < 1
  assert np.all(np.asarray(g)[~inside] == 0) and np.all(np.asarray(g)[inside] > 0)   # ApproxSign backward
  info = qm.meta["distill"]
  assert {"diffusion", "feature"} <= set(info["history"][-1][1])
  assert "kernel" not in st.extra["shortcut"]                            # 8 → 8 channels: identity shortcut
