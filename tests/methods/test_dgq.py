"""DGQ: K-means groups of channel ranges, the spread rule picking the token axis for token outliers, the log2
quantizer, start-token exclusion in cross-attention, and the recipe on a text-conditional mini U-Net."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import recipe
from dqjax.methods._act_extra import quantize_operand
from dqjax.methods.dgq import group_ranges, kmeans, spread
from dqjax.quant import log_quant
from tests.methods import correction_nets as cn


def test_groups_spread_and_log2():
  # two families of channels with very different ranges fall into different groups
  lo = jnp.concatenate([jnp.full((6,), -0.1), jnp.full((4,), -5.0)]) + 0.01 * jnp.arange(10)
  hi = jnp.concatenate([jnp.full((6,), 0.2), jnp.full((4,), 6.0)]) + 0.01 * jnp.arange(10)
  lab = np.asarray(kmeans(jnp.stack([lo, hi], -1), 2))
  assert len(set(lab[:6])) == 1 and len(set(lab[6:])) == 1 and lab[0] != lab[9]
  glo, ghi = group_ranges(lo[None], hi[None], 2)
  np.testing.assert_allclose(glo[0, :6], float(jnp.min(lo[:6])))
  np.testing.assert_allclose(ghi[0, 6:], float(jnp.max(hi[6:])))
  # token outliers: the per-token ranges spread more than the per-channel ones
  x = jax.random.normal(jax.random.key(0), (4, 16, 8)).at[:, 3, :].multiply(20.0)
  by_channel = (jnp.min(x, (0, 1)), jnp.max(x, (0, 1)))
  by_token = (jnp.min(x, (0, 2)), jnp.max(x, (0, 2)))
  assert spread(*by_token) > spread(*by_channel)
  # log2: values are Δ·2^-q; small probabilities keep their relative precision
  p = jax.nn.softmax(3.0 * jax.random.normal(jax.random.key(1), (64, 64)), -1)
  d = log_quant.search_delta(p, 4)
  ql = log_quant.log2_fake_quant(p, d, 4)
  q = np.asarray(log_quant.log2_codes(p, d, 4))
  np.testing.assert_allclose(ql, d * 2.0 ** -q, rtol=1e-6)
  mid = (p > 1e-3) & (p < 1e-2)
  uni = jnp.round(p / (d / 15)) * (d / 15)
  assert float(jnp.mean(jnp.abs(ql - p)[mid] / p[mid])) < float(jnp.mean(jnp.abs(uni - p)[mid] / p[mid]))


def test_recipe_on_text_mini_unet():
  model, params, ex = cn.mini(text=True)
  e = cn.text_env(4)
  data = cn.fp_calib(e, model, params, n=4)
  qm = recipe.build("dgq", {"group_num": 3, "weight_init": "minmax", "act_init": "minmax"})(model, params, ex, data, w_bits=8, a_bits=8, env=e)
  # grouped per-step tables: at most group_num distinct scales per step along the chosen axis
  spec = qm.plan["attn2/to_q"].act_spec("input")
  assert spec.granularity == "channel" and spec.axis in (-1, -2)
  scale = np.asarray(qm.qstate["attn2/to_q"].acts["input"].qp.scale)
  assert scale.shape[0] == data.num_steps
  assert all(len(np.unique(s)) <= 3 for s in scale.reshape(scale.shape[0], -1))
  assert qm.plan["time_embedding/linear_2"].act_spec("input") is None     # TFMQ convention
  assert not qm.plan["conv_in"].quantized
  ex2 = qm.qstate["attn2/sv_matmul"].extra
  assert "lhs" in ex2["log2"] and "lhs" in ex2["exclude_first"]
  assert "lhs" in qm.qstate["attn1/sv_matmul"].extra["log2"] and "exclude_first" not in qm.qstate["attn1/sv_matmul"].extra
  assert "rhs" in qm.qstate["attn2/qk_matmul"].extra["exclude_first"]
  # start token: the first key's probability column passes through in float, the rest is log2-quantized
  op = qm.plan["attn2/sv_matmul"]
  p = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 2, 64, 4)) * 3, -1)
  module = types.SimpleNamespace(equation="bhqk,bhkd->bhqd")
  out = quantize_operand(p, op, qm.qstate[op.path], "lhs", jnp.full((2,), 500.0), hi_bits=8, module=module,
                         operand_index=0)
  np.testing.assert_array_equal(out[..., 0], p[..., 0])
  q = np.asarray(log_quant.log2_codes(p[..., 1:], log_quant.realtime_delta(p[..., 1:]), 8))
  np.testing.assert_allclose(out[..., 1:], log_quant.realtime_delta(p[..., 1:]) * 2.0 ** -q, rtol=1e-5)
  # the quantized model runs and stays close to float at W8A8
  x, t, c = data.xs[1][:4], jnp.full((4,), data.ts[1]), data.conds[1][:4]
  ref = jax.jit(model.apply)({"params": params}, x, t, c)   # jitted: one compile beats many eager ones
  rel = float(jnp.mean((jax.jit(lambda *a: qm.apply(*a))(x, t, c) - ref) ** 2) / jnp.mean(ref ** 2))
  assert rel < 0.05
