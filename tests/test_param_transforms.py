"""Equivalent parameter-tree transforms keep the float function (≤ 1e-4) and compose with quantization."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules
from dqjax.transform import param_transforms as pt
from dqjax.transform.rules import Rule
from tests.nets import TinyNet


@pytest.fixture(scope="module")
def fp_qm():
  model = TinyNet(features=8)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.full((4,), 100.0)
  params = model.init(jax.random.key(1), x, t)["params"]
  # A plan that quantizes nothing: the transforms alone must leave the function unchanged.
  qm = recipe.prepare(model, params, [Rule(".*")], (x, t), warn_unused=False)
  return qm, x, t


def _fp(qm, x, t):
  return qm.model.apply({"params": qm.fp_params}, x, t)


def test_smoothing_rotation_lowrank_lora_keep_function(fp_qm):
  qm, x, t = fp_qm
  ref = _fp(qm, x, t)
  s = jnp.linspace(0.5, 3.0, 8)
  out = pt.smooth(qm, "to_q", s)
  out = pt.smooth(out, "conv_mid", jnp.linspace(2.0, 0.25, 8))
  out = pt.rotate(out, "to_k", pt.hadamard(8))
  out = pt.rotate(out, "to_v", pt.random_orthogonal(8, jax.random.key(3)))
  out = pt.add_lowrank_branch(out, "to_v", rank=3)
  out = pt.add_lora(out, "conv_out", rank=2, key=jax.random.key(4))
  got = out.apply(x, t)
  np.testing.assert_allclose(got, ref, atol=1e-4)
  assert not np.allclose(out.params["to_q"]["kernel"], qm.params["to_q"]["kernel"])


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x, t, cond=None):
    return nn.Dense(4, name="second")(nn.Dense(8, name="first")(x))


def test_fold_smoothing_into_previous_layer():
  model = TwoDense()
  x = jax.random.normal(jax.random.key(0), (3, 5))
  t = jnp.zeros((3,))
  params = model.init(jax.random.key(1), x, t)["params"]
  qm = recipe.prepare(model, params, [Rule(".*")], (x, t), warn_unused=False)
  ref = model.apply({"params": params}, x, t)
  smoothed = pt.smooth(qm, "second", jnp.linspace(0.5, 2.0, 8))
  folded = pt.fold_smoothing(smoothed, "second", "first")
  assert folded.qstate["second"].smooth is None
  np.testing.assert_allclose(model.apply({"params": folded.params}, x, t), ref, atol=1e-5)
  with pytest.raises(ValueError, match="has no smoothing to fold"):
    pt.fold_smoothing(folded, "second", "first")


def test_lowrank_branch_reduces_quantization_error_of_outlier_weights(fp_qm):
  qm0, x, t = fp_qm
  model = qm0.model
  params = jax.tree_util.tree_map(lambda a: a, qm0.fp_params)
  k = params["to_v"]["kernel"]
  params["to_v"]["kernel"] = k + 5.0 * jnp.outer(jnp.ones(8), jnp.eye(8)[0])   # a rank-1 outlier column
  ref = model.apply({"params": params}, x, t)
  data = CalibData(x[None].repeat(2, 0), jnp.array([100.0, 100.0]))
  errs = []
  for rank in (0, 1):
    qm = recipe.prepare(model, params, [Rule("to_v", weight=standard_rules(3, 16)[-1].weight)], (x, t))
    if rank:
      qm = pt.add_lowrank_branch(qm, "to_v", rank)
    qm = calibrate.calibrate_activations(calibrate.calibrate_weights(qm, "minmax"), data)
    errs.append(float(jnp.mean((qm.apply(x, t) - ref) ** 2)))
  assert errs[1] < errs[0]


def test_lora_merge_then_quantize_equals_quantized_merged_weight(fp_qm):
  qm, x, t = fp_qm
  qm = recipe.prepare(qm.model, qm.fp_params, standard_rules(4, 16), (x, t), warn_unused=False)
  qm = pt.add_lora(qm, "conv_mid", rank=2, key=jax.random.key(0))
  a, b = qm.qstate["conv_mid"].lora
  qm = qm.replace(qstate={**qm.qstate, "conv_mid": qm.qstate["conv_mid"].replace(lora=(a, b + 0.05))})
  qm = calibrate.calibrate_weights(qm, "minmax")
  merged = calibrate.calibrate_weights(pt.merge_lora(qm), "minmax")
  np.testing.assert_allclose(qm.apply(x, t), merged.apply(x, t), atol=1e-5)


def test_transform_errors(fp_qm):
  qm, _, _ = fp_qm
  with pytest.raises(ValueError, match="expected \\(8,\\)"):
    pt.smooth(qm, "to_q", jnp.ones(3))
  with pytest.raises(ValueError, match="accepts Dense or Conv"):
    pt.smooth(qm, "qk_matmul", jnp.ones(8))
  with pytest.raises(ValueError, match="power of two"):
    pt.hadamard(12)
  with pytest.raises(ValueError, match="1×1 convolution"):
    pt.add_lowrank_branch(qm, "conv_mid", 2)
  with pytest.raises(ValueError, match="accepted 1..7"):
    pt.split_input(qm, "conv_mid", 8)
