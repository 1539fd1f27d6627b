"""PTQ4DiT: CSB balances saliences, SSC weights complementary samples, the re-parameterization is exact and
balancing lowers the quantization error of outlier activations."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqjax.calib import smoothing as sm
from dqjax.methods import recipe
from dqjax.methods.ptq4dit import csb_ssc_factors, csb_ssc_pass
from tests.methods.dit_ptq_nets import calib, fp_out, tiny_dit


def test_ssc_moves_balance_toward_complementary_samples():
  sw = jnp.array([4.0, 1.0, 1.0, 1.0])
  aligned = jnp.array([8.0, 1.0, 1.0, 1.0])          # outlier where the weight is large too (ρ high)
  complementary = jnp.array([1.0, 8.0, 1.0, 1.0])    # outlier where the weight is small (ρ low)
  sx = jnp.stack([aligned, complementary])
  lam, eta = csb_ssc_factors(sx, sw, ssc=True)
  assert float(eta[1]) > float(eta[0])
  sbar = eta[0] * aligned + eta[1] * complementary
  np.testing.assert_allclose(lam, jnp.sqrt(sbar / sw), rtol=1e-5)       # CSB: λ = √(s̄_X / s_W)
  lam_max, eta_none = csb_ssc_factors(sx, sw, ssc=False)
  assert eta_none is None and float(lam[1]) < float(lam_max[1])


def test_reparam_is_exact_and_balancing_reduces_error():
  model, params, ex = tiny_dit()
  params = jax.tree_util.tree_map(np.asarray, params)      # as the zoo loads them: numpy leaves
  data = calib()
  plain = recipe.prepare(model, params, recipe.build("ptq4dit").rules(8, 8, "dit"), ex, warn_unused=False)
  folded = csb_ssc_pass()(plain, data)
  # every divisor of qkv / proj / fc1 went into adaLN rows or V: nothing online, function unchanged
  assert all(st.smooth is None for st in folded.qstate.values())
  assert set(folded.meta["ptq4dit"]) == {"transformer_blocks_0/qkv", "transformer_blocks_0/proj",
                                         "transformer_blocks_0/fc1"}
  ref = fp_out(model, params, data, 2)
  got = sm.float_apply(folded, data.xs[2], jnp.full((8,), data.ts[2]), data.conds[2])
  np.testing.assert_allclose(got, ref, atol=1e-4)
  for path in ("transformer_blocks_0/norm1/linear", "transformer_blocks_0/attn1/to_v"):
    assert not np.allclose(sm.kernel_of(folded, path), sm.kernel_of(plain, path))
  # W8A4 on the block linears: the injected activation outliers dominate; CSB+SSC must beat the same recipe
  # without balancing
  errs = {}
  f = None
  for kinds in (("qkv", "proj", "fc1"), ()):
    cfg = ml_collections.ConfigDict({"kinds": kinds, "weight_method": "minmax", "act_method": "minmax",
                                     "keep_fp": ("embed", "adaln", "first_last"), "quantize_matmuls": False})
    qm = recipe.build("ptq4dit", cfg)(model, params, ex, data, w_bits=8, a_bits=4, model_family="dit")
    f = f or sm.model_error_fn(qm, data, samples_per_step=8)
    errs[kinds] = float(f(qm.params, qm.qstate)["eps"])
  assert errs[("qkv", "proj", "fc1")] < 0.8 * errs[()]
