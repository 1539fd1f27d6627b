"""Q-Diffusion: shortcut splitting over the skip concat, uniform timestep calibration, BRECQ on split
kernels."""
import ml_collections
import numpy as np
import pytest

from dqjax.calib import calib_sets
from dqjax.methods import recipe
from dqjax.methods._unet_ptq import skip_concat_splits, split_shortcuts_pass
from dqjax.methods.q_diffusion import uniform_steps
from tests.methods.unet_ptq_nets import tiny_unet, trajectory


def _config(**kw):
  from configs.methods.q_diffusion import get_config
  c = get_config()
  c.calib_steps = 4
  c.iters_w = 5                     # compiles dominate; a few steps show the learned logits and act steps
  c.iters_a = 5
  # the first split block (the inputs' capture compiles the U-Net only up to it), with inputs from the float
  # model: the quantized-model capture (BRECQ's asym inputs, tested in test_reconstruct) would compile it twice
  # more; the block itself still runs with its split kernel and split activation quantizers
  c.recon_only = "up_blocks_0/resnets_0"
  c.recon_w_asym = c.recon_a_asym = False
  c.weight_init = "minmax"          # the searches are tested in the core; keep this test fast
  c.act_init = "minmax"
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def unet():
  return tiny_unet()        # once for the module


def test_split_shortcut_quantizers_exist_and_differ_per_half(unet):
  model, params, ex = unet
  data = trajectory(steps=4, n=4)
  qm = recipe.build("q_diffusion", _config())(model, params, ex, data, w_bits=4, a_bits=8)
  splits = qm.meta["shortcut_splits"]
  # every up-block ResBlock's 1x1 shortcut sees [h, skip]: the split is h's channel count
  assert splits == {"up_blocks_0/resnets_0/conv_shortcut": 16, "up_blocks_0/resnets_1/conv_shortcut": 16,
                    "up_blocks_1/resnets_0/conv_shortcut": 16, "up_blocks_1/resnets_1/conv_shortcut": 8}
  assert "down_blocks_1/resnets_0/conv_shortcut" not in splits     # its input is not a concat
  for path, ch in splits.items():
    op, st = qm.plan[path], qm.qstate[path]
    assert op.input_split == ch
    w0, w1 = np.asarray(st.weight.scale), np.asarray(st.weight_split.scale)
    assert w0.shape == w1.shape and not np.allclose(w0, w1)          # two weight quantizers
    a0, a1 = st.acts["input"].qp, st.acts["input_split"].qp           # two activation quantizers
    assert not np.allclose(np.asarray(a0.scale), np.asarray(a1.scale))
  # BRECQ learned AdaRound logits over the whole split kernel (both halves) of the reconstructed block
  v = qm.qstate["up_blocks_0/resnets_0/conv_shortcut"].rounding
  assert v is not None and v.shape == (1, 1, 32, 16)
  assert "weights:up_blocks_0/resnets_0" in qm.meta["reconstruction"]
  assert "acts:up_blocks_0/resnets_0" in qm.meta["reconstruction"]
  # attention quantizers: softmax probabilities on an unsigned grid, q/k/v signed per-tensor
  sv = qm.plan["up_blocks_0/attentions_0/sv_matmul"]
  assert sv.act_spec("lhs").signed is False and sv.act_spec("rhs") is not None
  assert qm.plan["up_blocks_0/attentions_0/qk_matmul"].act_spec("lhs") is not None
  # weights are per-channel asymmetric, as in the code
  assert not qm.plan["conv_in"].weight.symmetric and qm.qstate["conv_in"].weight.zero_point is not None


def test_split_detection_follows_the_model_and_can_be_disabled(unet):
  model, params, ex = unet
  qm = recipe.prepare(model, params, recipe.build("q_diffusion", _config()).rules(8, 8), ex)
  assert len(skip_concat_splits(qm, trajectory(steps=1, n=1))) == 4
  q2 = split_shortcuts_pass(enabled=False)(qm, trajectory(steps=1, n=1))
  assert all(op.input_split is None for op in q2.plan.ops)


def test_uniform_timestep_calibration():
  data = trajectory(steps=10, n=4)
  sel = uniform_steps(ml_collections.ConfigDict({"calib_steps": 4, "calib_n": 4}))(None, data)
  hist = calib_sets.step_histogram(sel, data.ts)
  assert list(np.nonzero(hist)[0]) == [0, 3, 6, 9] and set(hist[hist > 0]) == {4}
