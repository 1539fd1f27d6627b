"""BinaryDM: learnable multi-basis binarizer, progressive binarization, shortcuts, low-rank mimicking."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import binarydm, recipe
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from tests.methods.qat_nets import run
from tests.methods.unet_ptq_nets import TINY, tiny_unet



def test_binarydm_multi_basis_levels_and_progressive_gates():
  model, params, args = tiny_unet()
  rec = recipe.build("binarydm", None)
  qm = recipe.prepare(model, params, rec.rules(1, 4, "unet"), args)
  qm = binarydm.binarize(qm)
  ex = qm.qstate["down_blocks_0/resnets_0/conv1"].extra
  assert "lmb" in ex and "alpha2" in ex["lmb"]                              # full resolution: two bases
  assert "xnor" in qm.qstate["mid_block/resnets_0/conv1"].extra            # deepest level: one basis
  assert qm.plan["down_blocks_0/resnets_0/conv1"].weight.bits == 2        # costed at 2 bits
  assert not qm.plan["conv_in"].quantized and not qm.plan["time_embedding/linear_1"].quantized
  assert not qm.plan["down_blocks_0/resnets_0/time_emb_proj"].quantized
  starts = {p: int(st.extra["gate"]["start"]) for p, st in qm.qstate.items() if "gate" in st.extra}
  assert starts["mid_block/resnets_0/conv1"] == 0 and starts["down_blocks_0/resnets_0/conv1"] == 1
  assert starts["up_blocks_1/resnets_0/conv1"] == 1 and starts["up_blocks_0/resnets_0/conv1"] == 0
  path = "down_blocks_0/resnets_0/conv1"
  w = qapply.get_kernel(params, path)
  # jitted, returning one kernel: XLA drops the other ops' quantizers (eager, each op's ops compile one by one)
  kernel_at = jax.jit(lambda p, q, step: qapply.get_kernel(hooks.extended_params(qm.plan, p, q, step=step), path))
  at0, at1 = kernel_at(qm.params, qm.qstate, 0), kernel_at(qm.params, qm.qstate, 1)
  np.testing.assert_array_equal(np.asarray(at0), np.asarray(w))            # not yet binarized at step 0
  for c in range(3):
    # α1·s1 + α2·s2: ≤ 4 levels (compared to 1e-6 relative: XLA may fuse the sum differently per element)
    assert np.unique(np.round(np.asarray(at1[..., c]) / np.abs(at1[..., c]).max(), 6)).size <= 4
  mid = jax.jit(lambda p, q: qapply.get_kernel(hooks.extended_params(qm.plan, p, q), "mid_block/resnets_0/conv1"))(
      qm.params, qm.qstate)
  assert np.unique(np.asarray(mid[..., 0])).size == 2
  assert "kernel" in qm.qstate["down_blocks_1/resnets_0/conv1"].extra["shortcut"]   # 8 → 16 channels: 1×1


def test_binarydm_training_with_low_rank_mimicking():
  # min/max activation init: the default MSE search adds a second compiled calibration pass (~5 s of CPU);
  # TinyNet's time embedding 'time_dense' float, as BinaryDM keeps a U-Net's (a smaller training step to compile)
  qm = run("binarydm", 1, 4, steps=5, feature_patterns=("conv_mid", "to_out_0|to_v"), lr_scales=1e-2,
           act_init="minmax", keep_fp=f"{binarydm.KEEP_FP}|time_dense")
  info = qm.meta["distill"]
  assert {"diffusion", "feature", "output"} <= set(info["history"][-1][1])
  assert info["trained_leaves"]["weights"] > 0 and info["trained_leaves"]["binarizer"] > 0
  st = qm.qstate["conv_mid"]
  assert float(st.extra["shortcut"]["gamma"]) != 0.3                      # the shortcut scale learned
  out = jax.jit(lambda *a: qm.apply(*a))(np.ones((2, 8, 8, 1), np.float32), np.full((2,), 300.0, np.float32))
  assert np.all(np.isfinite(np.asarray(out)))


def test_binarydm_shortcut_around_a_right_padded_downsampler():
  """DDPM's CIFAR-10 U-Net (and ddpm-mnist) downsample with padding=0: the stride-2 conv sees a 9×9 input for a
  4×4 output; the shortcut pools the 8×8 top-left window (it failed with a reshape error before)."""
  import dataclasses
  model, params, (x, t, _) = tiny_unet(config=dataclasses.replace(TINY, downsample_padding=0))
  rec = recipe.build("binarydm", None)
  qm = recipe.prepare(model, params, rec.rules(1, 16, "unet"), (x, t, None))   # float activations: no calibration
  path = "down_blocks_0/downsamplers_0/conv"
  assert qm.plan[path].info.input_shapes[0][1:3] == (9, 9)
  qm = binarydm.binarize(qm, shortcut_gamma=0.5)           # shortcuts on every binary conv, γ = 0.5
  rng = np.random.default_rng(1)                          # numpy draws: jax.random.normal compiles for seconds
  xin = rng.standard_normal((2, 9, 9, 8), np.float32)
  got = hooks._shortcut(jnp.asarray(xin), np.zeros((2, 4, 4, 8), np.float32), None, qm.qstate[path])
  want = 0.5 * xin[:, :8, :8].reshape(2, 4, 2, 4, 2, 8).mean(axis=(2, 4), dtype=np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)   # float32 mean vs float64
  y = jax.jit(lambda *a: qm.apply(*a))(rng.standard_normal((2, 8, 8, 2), np.float32), t)
  assert y.shape == (2, 8, 8, 2) and np.all(np.isfinite(np.asarray(y)))
