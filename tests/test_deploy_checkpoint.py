"""Deploy mode (integer storage and kernels), checkpoints and sharded calibration."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dqjax import checkpoint, deploy
from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules
from dqjax.quant import tables
from experiments.demo_core import DemoNet
from tests.nets import TinyNet


def _key(seed):
  """An RngBitGenerator key: eager random draws compile far faster than threefry's (half of this helper's
  cold-cache time went to compiling threefry for each init shape); nothing here depends on the generator."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _qm(w_bits, a_bits, model=None, shape=(8, 8, 1), table=tables.TableSpec()):
  model = model or TinyNet()
  x = jax.random.normal(_key(0), (4,) + shape)
  t = jnp.full((4,), 500.0)
  params = model.init(_key(1), x, t)["params"]
  data = CalibData(jax.random.normal(_key(2), (3, 16) + shape), jnp.array([800.0, 500.0, 200.0]))
  qm = recipe.prepare(model, params, standard_rules(w_bits, a_bits), (x, t))
  qm = calibrate.calibrate_weights(qm, "mse")
  return calibrate.calibrate_activations(qm, data, "minmax", table=table), x, t


@pytest.mark.parametrize("w_bits", [8, 4])
def test_deploy_matches_simulate(w_bits):
  qm, x, t = _qm(w_bits, 8)
  sim = qm.apply(x, t)
  stripped, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
  assert "kernel" not in stripped["conv_mid"]
  dep = jax.jit(lambda p, d: qm.replace(params=p).apply(x, t, mode="deploy", deployed=d))(stripped, deployed)
  # int8 kernels accumulate exactly in int32; the only difference is float rounding of the epilogue.
  np.testing.assert_allclose(dep, sim, atol=2e-4, rtol=1e-4)
  no_int = qm.replace(params=stripped).apply(x, t, mode="deploy", deployed=deployed, use_int_kernels=False)
  np.testing.assert_allclose(no_int, sim, atol=2e-5)


def test_deploy_uses_integer_dot_and_conv():
  qm, x, t = _qm(8, 8)
  stripped, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
  hlo = jax.jit(lambda p, d: qm.replace(params=p).apply(x, t, mode="deploy", deployed=d)).lower(
      stripped, deployed).as_text()
  assert "xi32>" in hlo and ("stablehlo.convolution" in hlo)


def test_deploy_weight_bytes_shrink():
  for w_bits, floor in ((8, 3.9), (4, 7.5)):
    model = DemoNet()
    qm, x, t = _qm(w_bits, 8, model=model, shape=(16, 16, 3))
    _, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
    sizes = deploy.kernel_bytes(qm.plan, qm.fp_params, deployed)
    assert sizes["fp32"] / (sizes["codes"] + sizes["scales"]) >= floor


def test_checkpoint_round_trip_is_exact(tmp_path):
  qm, x, t = _qm(4, 8, table=tables.TableSpec("per_step"))
  path = checkpoint.save(str(tmp_path / "ckpt"), qm.plan, qm.params, qm.qstate, metadata={"model": "tiny"})
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  got = checkpoint.restore(path, expect_plan=qm.plan)
  assert got["plan"] == qm.plan and got["metadata"] == {"model": "tiny"}
  a = jax.tree_util.tree_leaves(qm.qstate)
  b = jax.tree_util.tree_leaves(got["qstate"])
  assert len(a) == len(b)
  for la, lb in zip(a, b):
    np.testing.assert_array_equal(la, lb)
  out = qm.replace(params=got["params"], qstate=got["qstate"]).apply(x, t)
  np.testing.assert_array_equal(out, qm.apply(x, t))


def test_checkpoint_errors(tmp_path):
  qm, _, _ = _qm(8, 8)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(str(tmp_path / "missing"))
  path = checkpoint.save(str(tmp_path / "c"), qm.plan, qm.params, qm.qstate)
  other, _, _ = _qm(8, 8, model=DemoNet(), shape=(16, 16, 3))
  with pytest.raises(checkpoint.CheckpointError, match="does not match the model: unexpected ops"):
    checkpoint.restore(path, expect_plan=other.plan)
  with open(os.path.join(path, "header.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    checkpoint.restore(path)
  path2 = checkpoint.save(str(tmp_path / "d"), qm.plan, qm.params, qm.qstate)
  header = json.load(open(os.path.join(path2, "header.json")))
  header["format_version"] = 99
  json.dump(header, open(os.path.join(path2, "header.json"), "w"))
  with pytest.raises(checkpoint.CheckpointError, match="format_version=99"):
    checkpoint.restore(path2)


def test_sharded_calibration_equals_single_device():
  assert len(jax.devices()) == 8
  model = TinyNet()
  x = jax.random.normal(_key(0), (4, 8, 8, 1))
  t = jnp.full((4,), 500.0)
  params = model.init(_key(1), x, t)["params"]
  data = CalibData(jax.random.normal(_key(2), (2, 16, 8, 8, 1)), jnp.array([700.0, 300.0]))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = CalibData(jax.device_put(data.xs, NamedSharding(mesh, P(None, "data"))), data.ts)
  results = []
  for d in (data, sharded):
    qm = recipe.prepare(model, params, standard_rules(8, 8), (x, t))
    qm = calibrate.calibrate_activations(calibrate.calibrate_weights(qm, "mse"), d, "mse")
    results.append(qm.qstate)
  for la, lb in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_checkpoint_keeps_the_quantized_forward_kind(tmp_path):
  """A QAT / activation-extras model restored from a checkpoint runs its own forward, not the core's."""
  from dqjax.methods._act_extra import ExtQModel, as_ext
  from dqjax.transform import hooks
  qm, x, t = _qm(8, 8)
  for wrap, cls in ((hooks.as_qat_model, hooks.QATModel), (as_ext, ExtQModel), (lambda m: m, recipe.QModel)):
    q = wrap(qm)
    path = checkpoint.save(str(tmp_path / cls.__name__), q.plan, q.params, q.qstate,
                           metadata={"forward": recipe.forward_kind(q)})
    saved = checkpoint.restore(path)
    back = recipe.with_forward(qm.replace(params=saved["params"], qstate=saved["qstate"]),
                               saved["metadata"]["forward"])
    assert type(back) is cls
    np.testing.assert_array_equal(np.asarray(back.apply(x, t)), np.asarray(q.apply(x, t)))
  with pytest.raises(ValueError, match="forward='Bogus'.*accepted values"):
    recipe.with_forward(qm, "Bogus")
