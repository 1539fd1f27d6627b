"""DiTAS: temporal-aggregated salience, per-layer α chosen by output error, exact folding, LoRA branches."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqjax.calib import smoothing as sm
from dqjax.methods import recipe
from dqjax.methods.ditas import tas_search_pass
from tests.methods.dit_ptq_nets import calib, fp_out, tiny_dit


def test_tas_grid_search_and_reparam():
  model, params, ex = tiny_dit()
  data = calib()
  rules = recipe.build("ditas", ml_collections.ConfigDict(dict(group_size=8))).rules(4, 8, "dit")
  qm = recipe.prepare(model, params, rules, ex, warn_unused=False)
  groups = sm.dit_groups(qm.plan)
  firsts = [g.paths[0] for g in groups]
  # TAS salience is the running max over every timestep and sample (one observation of all groups' inputs)
  per = sm.channel_absmax(qm, data, firsts)
  tas = sm.temporal_absmax(qm, data, firsts)
  p0 = firsts[0]
  np.testing.assert_allclose(tas[p0], jnp.max(per[p0], axis=(0, 1)))
  assert np.any(np.asarray(tas[p0]) > 1.5 * np.asarray(jnp.max(per[p0][-1], 0)))   # one step alone would miss range
  out = tas_search_pass(num_alphas=11, fold=True, samples_per_step=8)(qm, data)
  alphas = out.meta["ditas_alpha"]
  assert set(alphas) == {g.name for g in groups}
  # each chosen α is the best of the grid for its layer's own output error
  rows = sm.capture_rows(qm, data, firsts, samples_per_step=8)
  error = jax.jit(sm.layer_output_error, static_argnums=(3, 4))    # one compile per layer, not eager op-by-op
  for g in groups:
    op = qm.plan[g.paths[0]]
    k = sm.group_kernel(qm, g)
    errs = [float(error(rows[g.paths[0]], k, sm.balance_factors(tas[g.paths[0]], sm.weight_salience([k]), a),
                        op.weight, op.act_spec("input"))) for a in np.linspace(0, 1, 11)]
    assert abs(np.linspace(0, 1, 11)[int(np.argmin(errs))] - alphas[g.name]) < 1e-6
  # re-parameterized: only fc2 keeps an online divisor; the float function is unchanged
  assert {p for p, st in out.qstate.items() if st.smooth is not None} == {"transformer_blocks_0/ff/net_2"}
  got = jax.jit(lambda *a: sm.float_apply(out, *a))(data.xs[0], jnp.full((8,), data.ts[0]), data.conds[0])
  np.testing.assert_allclose(got, fp_out(model, params, data, 0), atol=1e-4)


def test_ditas_recipe_quantizers_and_lora():
  model, params, ex = tiny_dit()
  data = calib()
  cfg = ml_collections.ConfigDict(dict(num_alphas=5, lora_rank=2, lora_iters=3, group_size=8))
  qm = recipe.build("ditas", cfg)(model, params, ex, data, w_bits=4, a_bits=8, model_family="dit")
  q = qm.plan["transformer_blocks_0/attn1/to_q"]
  assert q.weight.granularity == "group" and q.weight.group_size == 8 and not q.weight.symmetric
  a = q.act_spec("input")
  assert a.granularity == "tensor" and a.dynamic and not a.symmetric
  assert not qm.plan["transformer_blocks_0/norm1/linear"].quantized and not qm.plan["proj_out_2"].quantized
  for p in ("transformer_blocks_0/attn1/to_q", "transformer_blocks_0/ff/net_2"):
    a_, b_ = qm.qstate[p].lowrank
    assert a_.shape[1] == 2 and b_.shape[0] == 2
  out = qm.apply(data.xs[1], jnp.full((8,), data.ts[1]), data.conds[1])
  ref = fp_out(model, params, data, 1)
  assert float(jnp.mean((out - ref) ** 2)) < 0.05 * float(jnp.mean(ref ** 2))
