"""SVDQuant: low-rank-aware smoothing search, alternating rank-r float branch, 4-bit residual, deploy mode."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqjax import deploy
from dqjax.calib import smoothing as sm
from dqjax.methods import recipe
from dqjax.transform import apply as qapply
from tests.methods.dit_ptq_nets import calib, fp_out, tiny_dit


def test_svdquant_w4a4_branch_residual_and_deploy():
  model, params, ex = tiny_dit()
  data = calib()
  cfg = ml_collections.ConfigDict(dict(rank=2, group_size=8, num_grids=4, lowrank_iters=4))
  qm = recipe.build("svdquant", cfg)(model, params, ex, data, w_bits=4, a_bits=4, model_family="dit")
  paths = [f"transformer_blocks_0/{r}" for r in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out_0",
                                                 "ff/net_0/proj", "ff/net_2")]
  for p in paths:
    st, op = qm.qstate[p], qm.plan[p]
    assert st.smooth is not None and st.lowrank is not None and st.lowrank[0].shape[1] == 2
    # residual + branch = the smoothed float weight
    w_hat = sm.kernel_of(qm, p) + st.lowrank[0] @ st.lowrank[1]
    np.testing.assert_allclose(w_hat, qapply.get_kernel(params, p) * st.smooth[:, None], atol=1e-5)
    assert op.weight.group_size == 8 and op.weight.bits == 4
    a = op.act_spec("input")
    assert a.dynamic and a.granularity == "group" and a.bits == 4
  assert not qm.plan["transformer_blocks_0/ff/net_2"].act_spec("input").symmetric   # post-GELU: shifted range
  assert qm.plan["transformer_blocks_0/norm1/linear"].weight is not None            # adaLN weight-only
  assert not qm.plan["transformer_blocks_0/norm1/linear"].acts
  for name, scores in qm.meta["svdquant_lowrank_scores"].items():
    assert min(scores) <= scores[0]
  # float function of the transformed model (smoothing + branch + float residual) is the FP model
  ref = fp_out(model, params, data, 1)
  t = jnp.full((8,), data.ts[1])
  args = (data.xs[1], t, data.conds[1])
  # jitted: one compile each (eagerly, every op compiles on its own); LLVM's optimisations only cost compile
  # time on these tiny arrays (IEEE results are the same)
  run = lambda f: jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})(*args)
  np.testing.assert_allclose(run(lambda *a: sm.float_apply(qm, *a)), ref, atol=1e-4)
  apply = lambda m: run(lambda *a: m.apply(*a))
  sim = apply(qm)
  stripped, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
  assert deployed["stored"]["transformer_blocks_0/ff/net_2"][0].kind == "int4"   # 4-bit codes packed two per byte
  dep = run(lambda x, tt, c: qapply.quantized_apply(model, qm.plan, stripped, qm.qstate, x, tt, c, t=tt,
                                                    mode="deploy", deployed=deployed))
  np.testing.assert_allclose(dep, sim, atol=1e-4)
  nolr = recipe.build("svdquant", ml_collections.ConfigDict(dict(rank=0, group_size=8, num_grids=4)))(
      model, params, ex, data, w_bits=4, a_bits=4, model_family="dit")
  err = lambda m: float(jnp.mean((apply(m) - ref) ** 2))
  assert float(jnp.mean((sim - ref) ** 2)) < err(nolr)
