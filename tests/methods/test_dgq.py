"""DGQ: K-means groups of channel ranges, the spread rule picking the token axis for token outliers, the log2
quantizer, start-token exclusion in cross-attention, and the recipe on a text-conditional mini U-Net."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib.data import CalibData
from dqjax.diffusion import samplers
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
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 8)), jnp.float32).at[:, 3, :].multiply(20.0)
  by_channel = (jnp.min(x, (0, 1)), jnp.max(x, (0, 1)))
  by_token = (jnp.min(x, (0, 2)), jnp.max(x, (0, 2)))
  assert spread(*by_token) > spread(*by_channel)
  # log2: values are Δ·2^-q; small probabilities keep their relative precision
  p = jax.nn.softmax(3.0 * np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32), -1)
  d = log_quant.search_delta(p, 4)
  ql = log_quant.log2_fake_quant(p, d, 4)
  q = np.asarray(log_quant.log2_codes(p, d, 4))
  np.testing.assert_allclose(ql, d * 2.0 ** -q, rtol=1e-6)
  mid = (p > 1e-3) & (p < 1e-2)
  uni = jnp.round(p / (d / 15)) * (d / 15)
  assert float(jnp.mean(jnp.abs(ql - p)[mid] / p[mid])) < float(jnp.mean(jnp.abs(uni - p)[mid] / p[mid]))


def text_calib(steps: int = 4, n: int = 4, seed: int = 0) -> CalibData:
  """Calibration batches shaped as cn.fp_calib makes them with cn.text_env (CFG: every step holds [x; x] with
  caption states [c; null], whose first token is a shared constant like a start token), at the DDIM steps'
  timesteps, drawn with numpy: sampling the float trajectory compiles the sampler and four jax.random draws."""
  rng = np.random.default_rng(seed)
  first = 2.0 * rng.normal(size=(1, 8))
  caps = np.concatenate([np.broadcast_to(first, (n, 1, 8)), rng.normal(size=(n, 3, 8))], axis=1)
  null = np.broadcast_to(np.concatenate([first, np.zeros((3, 8))]), (n, 4, 8))
  x = rng.normal(size=(steps, n, 8, 8, 2)) * np.linspace(1.0, 0.3, steps)[:, None, None, None, None]
  xs = np.concatenate([x, x], axis=1).astype(np.float32)
  conds = np.broadcast_to(np.concatenate([caps, null]), (steps, 2 * n, 4, 8)).astype(np.float32)
  ts = samplers.timesteps_for(cn.SCHEDULE, samplers.SamplerConfig("ddim", steps)).astype(np.float32)
  return CalibData(*jax.device_put((xs, ts, conds, np.arange(steps))))


def test_recipe_on_text_mini_unet():
  model, params, ex = cn.mini(text=True)
  data = text_calib()
  qm = recipe.build("dgq", {"group_num": 3, "weight_init": "minmax", "act_init": "minmax"})(
      model, params, ex, data, w_bits=8, a_bits=8)
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
  p = jax.nn.softmax(np.random.default_rng(2).normal(size=(2, 2, 64, 4)).astype(np.float32) * 3, -1)
  module = types.SimpleNamespace(equation="bhqk,bhkd->bhqd")
  # jitted (here and below): one compile beats many eager ones
  out = jax.jit(lambda a: quantize_operand(a, op, qm.qstate[op.path], "lhs", jnp.full((2,), 500.0), hi_bits=8,
                                           module=module, operand_index=0))(p)
  np.testing.assert_array_equal(out[..., 0], p[..., 0])

  @jax.jit
  def log2_values(r):                # Δ·2^-q with the example's own Δ
    d = log_quant.realtime_delta(r)
    return d * 2.0 ** -log_quant.log2_codes(r, d, 8)

  np.testing.assert_allclose(out[..., 1:], log2_values(p[..., 1:]), rtol=1e-5)
  # the quantized model runs and stays close to float at W8A8
  x, t, c = jax.device_put((np.asarray(data.xs)[1, :4], np.full((4,), data.ts[1], np.float32),
                            np.asarray(data.conds)[1, :4]))
  ref = jax.jit(model.apply)({"params": params}, x, t, c)   # jitted: one compile beats many eager ones
  rel = float(jnp.mean((jax.jit(lambda *a: qm.apply(*a))(x, t, c) - ref) ** 2) / jnp.mean(ref ** 2))
  assert rel < 0.05
