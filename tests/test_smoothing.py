"""Shared DiT-PTQ building blocks: salience statistics, Spearman weighting, balancing factors, exact folds,
rotations, output-error searches, alternating low-rank branches and compiled candidate evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dqjax.calib import calibrate
from dqjax.calib import smoothing as sm
from dqjax.methods import recipe
from dqjax.quant.spec import QuantSpec
from dqjax.transform.rules import Rule
from tests.methods.dit_ptq_nets import D, calib, fp_out, tiny_dit

W4 = QuantSpec("int", 4, symmetric=True, granularity="channel", axis=-1)
A4 = QuantSpec("int", 4, symmetric=False, granularity="tensor")


@pytest.fixture(scope="module")
def fp_qm():
  model, params, ex = tiny_dit()
  return recipe.prepare(model, params, [Rule(".*")], ex, warn_unused=False), calib()


def test_spearman_matches_scipy_and_ssc_prefers_complementary_rows():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, size=(6, 12)).astype(np.float32)      # ties on purpose
  b = rng.normal(size=12).astype(np.float32)
  got = np.asarray(sm.spearman(jnp.asarray(a), jnp.asarray(b)))
  want = [scipy.stats.spearmanr(r, b).statistic for r in a]
  np.testing.assert_allclose(got, want, atol=1e-5)
  sw = jnp.arange(1.0, 9.0)
  sx = jnp.stack([sw, sw[::-1], jnp.ones(8).at[0].set(2.0)])   # ρ = 1, ρ = −1, in between
  eta = sm.ssc_weights(sx, sw)
  assert abs(float(jnp.sum(eta)) - 1.0) < 1e-6
  assert float(eta[1]) > float(eta[2]) > float(eta[0])        # least correlated row weighs most


def test_balance_factors_equalize_salience():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 8)) * np.array([1, 20, 1, 1, 0.1, 1, 5, 1]), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  sx, sw = jnp.max(jnp.abs(x), 0), sm.weight_salience([w])
  lam = sm.balance_factors(sx, sw, 0.5, 0.5)                  # PTQ4DiT CSB
  np.testing.assert_allclose(jnp.max(jnp.abs(x / lam), 0), jnp.max(jnp.abs(w * lam[:, None]), 1), rtol=1e-5)
  np.testing.assert_allclose(jnp.max(jnp.abs(x / lam), 0), jnp.sqrt(sx * sw), rtol=1e-5)
  np.testing.assert_allclose(x @ w, (x / lam) @ (w * lam[:, None]), atol=1e-4)
  assert sm.svdquant_grid(20).shape == (39, 2) and sm.alpha_grid(21).shape == (21, 2)


def test_salience_stats_and_exact_folds(fp_qm):
  qm, data = fp_qm
  groups = sm.dit_groups(qm.plan, only_quantized=False)
  assert [g.kind for g in groups] == ["qkv", "proj", "fc1", "fc2"]
  stats = sm.channel_absmax(qm, data, [g.paths[0] for g in groups])
  rows = sm.capture_rows(qm, data, [groups[0].paths[0]], samples_per_step=data.num_samples, max_rows=None)
  s = stats[groups[0].paths[0]]
  assert s.shape == (data.num_steps, data.num_samples, D)
  np.testing.assert_allclose(jnp.max(s, (0, 1)), jnp.max(jnp.abs(rows[groups[0].paths[0]]), 0), rtol=1e-6)
  # the injected shift outliers (channels 1 and 5) dominate the qkv/fc1 input salience
  assert set(np.argsort(np.asarray(jnp.max(s, (0, 1))))[-2:]) == {1, 5}
  ref = fp_out(qm.model, qm.fp_params, data, 1)
  rng = np.random.default_rng(2)
  out = qm
  for g in groups:
    n = sm.kernel_of(qm, g.paths[0]).shape[0]
    out = sm.smooth_group(out, g, jnp.asarray(rng.uniform(0.3, 3.0, n), jnp.float32))
  with pytest.raises(ValueError, match="share one divisor"):
    sm.fold_into_modulation(sm.smooth_group(out, sm.SmoothGroup("x", (groups[0].paths[0],)), jnp.full(D, 2.0)),
                            groups[0].paths, "transformer_blocks_0/norm1/linear", 0, 1)
  for g in groups:
    out = sm.fold_group(out, g)
  smoothed = {p for p, st in out.qstate.items() if st.smooth is not None}
  assert smoothed == {"transformer_blocks_0/ff/net_2"}           # fc2 (after GELU) stays online
  got = out.apply(data.xs[1], jnp.full((data.num_samples,), data.ts[1]), data.conds[1])   # nothing quantized
  np.testing.assert_allclose(got, ref, atol=1e-4)
  assert not np.allclose(sm.kernel_of(out, "transformer_blocks_0/norm1/linear"),
                         sm.kernel_of(qm, "transformer_blocks_0/norm1/linear"))


def test_rotations_are_orthogonal_for_any_size():
  key = jax.random.key(0)
  for kind in ("block_hadamard", "kron", "random"):
    r = np.asarray(sm.rotation_matrix(kind, 96, key))
    np.testing.assert_allclose(r @ r.T, np.eye(96), atol=1e-5)
  bh = sm.block_hadamard(96)
  assert np.count_nonzero(bh) == 3 * 32 * 32                   # three 32×32 Hadamard blocks
  with pytest.raises(ValueError, match="power of two"):
    sm.rotation_matrix("hadamard", 96, key)
  with pytest.raises(ValueError, match="accepted values"):
    sm.rotation_matrix("givens", 8, key)


def test_output_error_search_matches_brute_force_and_beats_no_smoothing():
  W8 = W4.replace(bits=8)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(256, 16)) * (1 + 30 * (np.arange(16) == 3))
  x = jnp.asarray(x, jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  act, wst = jnp.max(jnp.abs(x), 0), sm.weight_salience([w])
  cands = sm.alpha_grid(11)
  errs, lam = sm.search_factors(x, w, act, wst, cands, W8, A4)
  brute = [float(sm.layer_output_error(x, w, sm.balance_factors(act, wst, a, b), W8, A4)) for a, b in cands]
  np.testing.assert_allclose(errs, brute, rtol=1e-4)
  best = int(np.argmin(brute))
  np.testing.assert_allclose(lam, sm.balance_factors(act, wst, *cands[best]), rtol=1e-6)
  plain = float(sm.layer_output_error(x, w, jnp.ones(16), W8, A4))
  assert brute[best] < 0.7 * plain                             # clearly better than no smoothing
  rot = sm.rotation_matrix("block_hadamard", 16, jax.random.key(1))
  errs_r, _ = sm.search_factors(x, w, act, wst, cands, W8, A4, rotation=rot, lowrank_rank=2)
  assert float(jnp.min(errs_r)) < brute[best]                  # rotation + low-rank branch help further


def test_alternating_lowrank_beats_plain_svd_and_sets_branch(fp_qm):
  qm, _ = fp_qm
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.standard_t(3, size=(32, 24)), jnp.float32)
  q = lambda m: sm.quantize_weight(m, W4)
  a, b, scores = sm.alternating_lowrank(w, 4, q, iters=8, early_stop=False)
  assert min(scores) < scores[0]                               # alternation improves on SVD_r(W)
  np.testing.assert_allclose(float(jnp.sum((w - q(w - a @ b) - a @ b) ** 2)), min(scores), rtol=1e-3)
  g = sm.dit_groups(qm.plan, only_quantized=False)[0]
  out, _ = sm.set_group_lowrank(qm, g, 3, lambda m: sm.quantize_weight(m, W4), iters=2)
  a0 = out.qstate[g.paths[0]].lowrank[0]
  for p in g.paths:                                            # shared down-projection, per-op up-projection
    np.testing.assert_array_equal(out.qstate[p].lowrank[0], a0)
    st = out.qstate[p]
    np.testing.assert_allclose(sm.kernel_of(out, p) + st.lowrank[0] @ st.lowrank[1], sm.kernel_of(qm, p),
                               atol=1e-5)


def test_variant_evaluation_compiles_once_and_matches_plans(fp_qm):
  qm0, data = fp_qm
  model, params, ex = tiny_dit()
  a_tok = QuantSpec("int", 4, symmetric=True, granularity="token", axis=-1)
  lin = sm.BLOCK_LINEARS
  qm = recipe.prepare(model, params, sm.build_rules(W4, a_tok, only=lin), ex, warn_unused=False)
  variants = {op.path: sm.OpVariants(((None, None), (op.weight, a_tok))) for op in qm.plan.quantized_ops}
  f = sm.variant_error_fn(qm, data, variants, samples_per_step=4, metrics=("eps", "guidance"))
  zero = f({p: 0 for p in variants})
  assert float(zero["eps"]) < 1e-10
  full = f({p: 1 for p in variants})
  ref = sm.model_error_fn(qm, data, samples_per_step=4, metrics=("eps", "guidance"))
  qmc = calibrate.calibrate_weights(qm, "minmax")
  want = ref(qmc.params, qmc.qstate)
  for k in ("eps", "guidance"):
    np.testing.assert_allclose(float(full[k]), float(want[k]), rtol=1e-4)
  one = f({**{p: 0 for p in variants}, "transformer_blocks_0/ff/net_2": 1})
  assert 0 < float(one["eps"]) < float(full["eps"])
  assert f.compiled._cache_size() == 1                         # every choice reused one compilation
  with pytest.raises(ValueError, match="static activation spec"):
    sm.variant_error_fn(qm, data, {"transformer_blocks_0/ff/net_2": sm.OpVariants(((W4, A4),))})


def test_fit_group_sizes_and_rules():
  model, params, ex = tiny_dit()
  g32 = QuantSpec("int", 4, granularity="group", axis=-2, group_size=32)
  a32 = QuantSpec("int", 8, symmetric=False, granularity="group", axis=-1, group_size=32)
  qm = recipe.prepare(model, params, sm.build_rules(g32, a32, keep_fp=sm.skip_patterns("dit", ("embed",))), ex,
                      warn_unused=False)
  plan = sm.fit_group_sizes(qm.plan)
  assert plan["pos_embed/proj"].weight.group_size == 4           # 2×2×4 patch kernel: 4 input channels
  assert plan["transformer_blocks_0/ff/net_2"].weight.group_size == 32   # 64 inputs: 32 divides
  assert plan["transformer_blocks_0/attn1/to_q"].act_spec("input").group_size == 16
  assert not plan["transformer_blocks_0/norm1/emb/timestep_embedder/linear_1"].quantized
  assert not plan["transformer_blocks_0/attn1/qk_matmul"].quantized
  with pytest.raises(ValueError, match="accepted values"):
    sm.skip_patterns("dit", ("embedders",))
