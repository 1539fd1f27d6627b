"""HQ-DiT: FP4 quantization with a per-layer, distribution-driven format choice after a Hadamard rotation."""
import jax
import jax.numpy as jnp
import numpy as np

from dqjax.methods import recipe
from dqjax.methods.hqdit import act_format_error, format_candidates, spec_for, weight_format_error
from tests.methods.dit_ptq_nets import calib, fp_out, tiny_dit


def test_format_choice_follows_the_distribution():
  assert format_candidates(4) == ("fp4_e2m1", "int4") and "fp8_e5m2" in format_candidates(8)
  rng = np.random.default_rng(0)                        # numpy: a jax.random draw compiles for seconds
  heavy = jnp.asarray(rng.standard_t(1.5, (512, 16)), jnp.float32)   # heavy tails: FP4's log-spaced grid wins
  flat = jnp.asarray(rng.uniform(-1, 1, (512, 16)), jnp.float32)    # uniform: the int4 (E1M2) grid wins
  err = lambda x, f: float(act_format_error(x, spec_for(f, granularity="tensor")))
  assert err(heavy, "fp4_e2m1") < err(heavy, "int4")
  assert err(flat, "int4") < err(flat, "fp4_e2m1")
  wt = lambda x, f: float(weight_format_error(x, spec_for(f, granularity="channel")))
  assert wt(heavy, "fp4_e2m1") < wt(heavy, "int4") and wt(flat, "int4") < wt(flat, "fp4_e2m1")


def test_hqdit_w4a4_rotation_and_formats():
  model, params, ex = tiny_dit()
  data = calib()
  qm = recipe.build("hqdit")(model, params, ex, data, w_bits=4, a_bits=4, model_family="dit")
  formats = qm.meta["hqdit_formats"]
  for op in qm.plan.quantized_ops:
    assert op.weight.effective_bits == 4 and op.act_spec("input").effective_bits == 4
    assert formats[op.path]["weight"] in ("fp4_e2m1", "int4") and formats[op.path]["act"] in ("fp4_e2m1", "int4")
    fmt = formats[op.path]["act"]
    assert op.act_spec("input").format == ("int" if fmt == "int4" else fmt)
  st = qm.qstate["transformer_blocks_0/ff/net_2"]
  assert st.rotate is not None and st.rotate.shape == (64, 64)
  np.testing.assert_allclose(st.rotate @ st.rotate.T, np.eye(64), atol=1e-5)
  # jitted: one compile; LLVM's optimisations only cost compile time on these tiny arrays (same IEEE results)
  out = jax.jit(lambda *a: qm.apply(*a), compiler_options={"xla_backend_optimization_level": 0})(
      data.xs[1], jnp.full((8,), data.ts[1]), data.conds[1])
  ref = fp_out(model, params, data, 1)
  assert np.isfinite(np.asarray(out)).all()
  assert float(jnp.mean((out - ref) ** 2)) < float(jnp.mean(ref ** 2))
