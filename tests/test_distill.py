"""The shared QAT engine (dqjax.calib.distill) and the extended forward (dqjax.transform.hooks)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax.calib import calibrate, distill
from dqjax.diffusion import samplers, schedules
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules
from dqjax.quant import lowbit
from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from dqjax.transform import param_transforms as pt
from tests.nets import TinyNet

ENV = recipe.DiffusionEnv(schedules.make_schedule("linear", 1000),
                          samplers.SamplerConfig("ddim", 4, clip_sample=True), (8, 8, 1))


@pytest.fixture(scope="module")
def setup():
  model = TinyNet()
  x = jnp.zeros((2, 8, 8, 1))
  t = jnp.full((2,), 10.0)
  params = model.init(jax.random.key(1), x, t)["params"]
  qm = recipe.prepare(model, params, standard_rules(4, 4), (x, t)).replace(env=ENV)
  pool = distill.make_pool(qm, 8, 0)
  qm = calibrate.calibrate_weights(qm, "minmax")
  qm = calibrate.calibrate_activations(qm, distill.pool_calib_data(pool, ENV), "minmax",
                                       table=tables.TableSpec("per_step"))
  for i, p in enumerate(["conv_mid", "to_q"]):
    qm = pt.add_lora(qm, p, 2, jax.random.key(3 + i))
  return qm, pool


def _groups():
  return [distill.Group("lora", 1e-3, distill.lora()), distill.Group("act", 3e-4, distill.act_params())]


def _cfg(**kw):
  base = dict(steps=4, batch_size=4, pool_size=8, log_every=1, save_every=1, progress=False)
  base.update(kw)
  return distill.DistillConfig(**base)


def test_lora_merge_then_quantize_equals_quantized_merged_weight(setup):
  qm, _ = setup
  st = qm.qstate["conv_mid"]
  b = jax.random.normal(jax.random.key(9), st.lora[1].shape) * 0.05
  qm = qm.replace(qstate={**qm.qstate, "conv_mid": st.replace(lora=(st.lora[0], b))})
  via_forward = qapply.get_kernel(hooks.extended_params(qm.plan, qm.params, qm.qstate), "conv_mid")
  merged = pt.merge_lora(qm)
  w_merged = qapply.get_kernel(merged.params, "conv_mid")
  direct = qops.fake_quant(w_merged, st.weight, qm.plan["conv_mid"].weight)
  np.testing.assert_array_equal(np.asarray(via_forward), np.asarray(direct))
  assert merged.qstate["conv_mid"].lora is None
  assert not np.allclose(np.asarray(w_merged), np.asarray(qapply.get_kernel(qm.params, "conv_mid")))
  x, t = jnp.ones((2, 8, 8, 1)), jnp.full((2,), 500.0)
  np.testing.assert_allclose(np.asarray(qm.apply(x, t)), np.asarray(merged.apply(x, t)), atol=1e-5)


def test_masked_optimizer_state_has_no_moments_for_frozen_leaves(setup):
  qm, _ = setup
  variables = {"params": qm.params, "qstate": qm.qstate}
  part = distill.partition(variables, _groups())
  train, frozen = part.split(variables)
  counts = part.counts()
  assert counts["lora"] == 4 and counts["act"] > 0
  assert len(train) == counts["lora"] + counts["act"]
  assert all(f is None for f, g in zip(frozen, part.labels) if g != distill.FROZEN)
  # the integer timestep index of every table is frozen, never a trained leaf
  assert not any(i.field.endswith("index") for i, g in zip(part.infos, part.labels) if g != distill.FROZEN)
  tx = distill.make_optimizer(_cfg(), _groups(), part, train)
  state = tx.init(train)
  inner = state.inner_states
  for g in ("lora", "act"):
    mu = inner[g].inner_state[0].mu
    present = [k for k, v in mu.items() if not isinstance(v, type(distill.optax.MaskedNode()))]
    assert sorted(present) == sorted(k for k, lab in part.label_tree().items() if lab == g)
  n_train = sum(int(np.size(v)) for v in train.values())
  n_state = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(state))
  # Adam's mu and nu per trained value, plus scalar step counts (at most 2 per group: Adam, schedule)
  assert 2 * n_train < n_state <= 2 * n_train + 2 * len(_groups())
  assert sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(variables)) > 10 * n_train


def test_distillation_reduces_the_error_to_the_teacher(setup):
  qm, pool = setup
  before = distill.stepwise_error(qm, pool)
  out = distill.distill(qm, _cfg(steps=24), _groups(), pool=pool)
  after = distill.stepwise_error(out, pool)
  assert after.mean() < 0.9 * before.mean()
  assert out.meta["distill"]["trained_leaves"]["lora"] == 4
  frozen_before = qapply.get_kernel(qm.params, "conv_out")
  np.testing.assert_array_equal(np.asarray(qapply.get_kernel(out.params, "conv_out")), np.asarray(frozen_before))


class _Stop(Exception):
  pass


def test_resumed_run_is_bit_identical(setup, tmp_path):
  qm, pool = setup
  full = distill.distill(qm, _cfg(steps=6, ckpt_dir=str(tmp_path / "a")), _groups(), pool=pool)

  def stop_at_4(step, metrics):
    if step == 4:
      raise _Stop()

  cfg = _cfg(steps=6, ckpt_dir=str(tmp_path / "b"))
  with pytest.raises(_Stop):
    distill.distill(qm, cfg, _groups(), pool=pool, callback=stop_at_4)
  assert distill.latest_checkpoint_step(str(tmp_path / "b")) == 3
  resumed = distill.distill(qm, cfg, _groups(), pool=pool)
  a = jax.tree_util.tree_leaves((full.params, full.qstate))
  b = jax.tree_util.tree_leaves((resumed.params, resumed.qstate))
  assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
  assert resumed.meta["distill"]["resumed_from"] == 3


def test_batch_orders_are_pure_and_follow_the_trajectory(setup):
  _, pool = setup
  s = pool.num_steps
  fn = distill.make_batch_fn(pool, _cfg(order="trajectory"), 1000)
  b0, b1, again = fn(0), fn(1), fn(0)
  np.testing.assert_array_equal(b0["x"], again["x"])
  assert float(b0["t"][0]) == float(pool.ts[0]) and float(b1["t"][0]) == float(pool.ts[1])
  epoch0 = [fn(i)["x"] for i in range(s)]
  # within an epoch the same trajectories are walked step by step (teacher forcing)
  sel = [int(np.argmin(np.abs(np.asarray(pool.xs[0]) - epoch0[0][k]).sum(axis=(1, 2, 3)))) for k in range(4)]
  np.testing.assert_allclose(epoch0[2], np.asarray(pool.xs[2])[sel])
  fwd = distill.make_batch_fn(pool, _cfg(order="forward", same_timestep=True), 1000)(3)
  assert len(set(np.asarray(fwd["t"]).tolist())) == 1 and np.any(fwd["noise"] != 0)
  with pytest.raises(ValueError, match="step_weights"):
    distill.make_batch_fn(pool, _cfg(order="random"), 1000, step_weights=np.ones(s + 1))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="DistillConfig.order"):
    distill.DistillConfig(order="sideways")
  with pytest.raises(ValueError, match="feature_patterns"):
    distill.DistillConfig(feature_weight=1.0)
  with pytest.raises(ValueError, match="reserved"):
    distill.Group("frozen", 1e-3, distill.lora())


def test_feature_losses():
  k1, k2 = jax.random.split(jax.random.key(0))
  f = jax.random.normal(k1, (2, 8, 8, 6))
  g = jax.random.normal(k2, (2, 8, 8, 6))
  assert float(distill.spd_loss(f, f, 4)) < 1e-5
  assert float(distill.spd_loss(f, g, 4)) > 0.1
  # each patch's Grams are normalised: a global rescale of the student does not matter
  assert abs(float(distill.spd_loss(3.0 * f, f, 4))) < 1e-5
  v = distill.lowrank_basis(f, 0.5)
  assert v.shape == (6, 3)
  np.testing.assert_allclose(np.asarray(v.T @ v), np.eye(3), atol=1e-5)


def test_feature_capture_in_student_and_teacher(setup):
  qm, _ = setup
  x, t = jnp.ones((2, 8, 8, 1)), jnp.full((2,), 500.0)
  out, feats = hooks.qat_apply(qm.model, qm.plan, qm.params, qm.qstate, x, t, capture=("conv_mid",))
  fp_out, fp_feats = hooks.capture_apply(qm.model, qm.fp_params, x, t, None, ("conv_mid",))
  assert set(feats) == set(fp_feats) == {"conv_mid"}
  np.testing.assert_allclose(np.asarray(out), np.asarray(qm.apply(x, t)), atol=1e-6)
  assert float(jnp.abs(feats["conv_mid"] - fp_feats["conv_mid"]).max()) > 0


def test_lowbit_ops():
  x = jnp.linspace(-2, 2, 9)
  g = jax.grad(lambda v: jnp.sum(lowbit.approx_sign(v)))(x)
  np.testing.assert_array_equal(np.asarray(lowbit.approx_sign(x)), np.where(np.asarray(x) >= 0, 1.0, -1.0))
  np.testing.assert_allclose(np.asarray(g), np.clip(2 - 2 * np.abs(np.asarray(x)), 0, None), atol=1e-6)
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5)) * 0.1
  a1, a2 = lowbit.lmb_init(w, 2)
  two = lowbit.lmb_weight(w, a1, a2)
  one = lowbit.lmb_weight(w, a1)
  assert float(jnp.mean((two - w) ** 2)) < float(jnp.mean((one - w) ** 2))
  assert np.unique(np.asarray(two[..., 0])).size <= 4
  k = lowbit.xnor_scale_map(jnp.ones((1, 6, 6, 3)), (3, 3), (1, 1), ((1, 1), (1, 1)))
  assert k.shape == (1, 6, 6, 1) and abs(float(k[0, 3, 3, 0]) - 1.0) < 1e-6 and float(k[0, 0, 0, 0]) < 1.0


def test_capture_of_a_block_returning_a_tuple_records_its_hidden_states():
  """DiT blocks return (hidden, embedding); feature distillation compares the hidden states (BitsFusion on
  dit-mnist failed subtracting tuples before)."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, emb):
      return nn.Dense(h.shape[-1], name="proj")(h) + emb, emb

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None):
      h, emb = Block(name="transformer_blocks_0")(x, t[:, None])
      return h

  x, t = jnp.ones((2, 3)), jnp.arange(2.0)
  params = Net().init(jax.random.key(0), x, t)["params"]
  out, feats = hooks.capture_apply(Net(), params, x, t, None, distill.DIT_BLOCK_OUTPUTS)
  assert set(feats) == {"transformer_blocks_0"}
  np.testing.assert_array_equal(np.asarray(feats["transformer_blocks_0"]), np.asarray(out))
