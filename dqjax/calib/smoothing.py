"""Shared building blocks of the DiT PTQ methods (PTQ4DiT, DiTAS, ViDiT-Q, HQ-DiT, SVDQuant, Q-DiT, A-QDiT).

Every DiT paper of the survey recombines the same few mechanisms; each lives here once:

* **statistics** over calibration data, observed in float with the QModel's current equivalent transforms
  applied: per-sample channel saliences max|X_j| (`channel_absmax`), raw layer inputs for output-error
  searches (`capture_rows`);
* **salience arithmetic**: weight salience max_o|W[j, o]|, Spearman rank correlation, PTQ4DiT's
  softmax(−ρ) sample weighting (SSC), balancing factors λ = s_x^α / s_w^β (SmoothQuant α, PTQ4DiT's
  square-root balance α = β = ½, SVDQuant's (α, β) grid, DiTAS' α grid);
* **groups and folding**: ops that share one input share one λ (to_q/to_k/to_v); a divisor is folded
  offline into the adaLN modulation rows (shift/scale, exact), into the producing op (to_v for to_out_0),
  or kept as an online divide (fc2 after GELU);
* **output-error searches** of smoothing strength, with the op's own weight/activation quantizers, an
  optional rotation and an optional low-rank branch in the loop (DiTAS, SVDQuant, ViDiT-Q);
* **low-rank branches** by alternating SVD / quantization (DiTAS' training-free LoRA, SVDQuant);
* **rotations** of any size (block-diagonal Hadamard for non-powers of two);
* **candidate evaluation**: a compiled denoiser-error function of (params, qstate), and one of per-op
  *variant indices* (each op switches among precomputed weight/activation quantizers with `lax.switch`),
  so Q-DiT's granularity search and ViDiT-Q's sensitivity sweep compile once for all candidates.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec
from dqjax.transform import apply as qapply
from dqjax.transform import param_transforms as pt
from dqjax.transform.discover import module_path, op_kind
from dqjax.transform.rules import OpPlan, Plan
from dqjax.transform.state import OpState, update_op

EPS = 1e-5


# =========================================================================================================
# Statistics
# =========================================================================================================
def _subset(data: CalibData, samples_per_step: Optional[int]) -> CalibData:
  if samples_per_step is None or samples_per_step >= data.num_samples:
    return data
  n = int(samples_per_step)
  return CalibData(data.xs[:, :n], data.ts, None if data.conds is None else data.conds[:, :n],
                   data.step_index)


def _float_forward(qm, params, stat_fn, x, t, c):
  """The model in float with the QModel's equivalent input transforms (smoothing divisors, rotations,
  low-rank branches) applied, returning (output, {path: {name: stat}})."""
  interceptor = qapply.make_interceptor(qm.plan, qm.qstate, t, quantize_acts=False, stat_fn=stat_fn,
                                        stat_reduce=None)
  with nn.intercept_methods(interceptor):
    out, variables = qm.model.apply({"params": params}, x, t, c, mutable=[qapply.STATS_COLLECTION])
  flat = traverse_util.flatten_dict(dict(variables.get(qapply.STATS_COLLECTION, {})), sep="/")
  stats: dict = {}
  for key, value in flat.items():
    path, name = key.rsplit("/", 1)
    stats.setdefault(path, {})[name] = value
  return out, stats


def float_apply(qm, x, t, cond=None):
  """The QModel's own parameters in float, with its equivalent transforms applied (smoothing divisors,
  rotations, low-rank branches) and nothing quantized: equals the float model when the transforms are exact."""
  return _float_forward(qm, qm.params, lambda *a: None, x, t, cond)[0]


def observe_inputs(qm, data: CalibData, paths: Sequence[str], fn: Callable[[jax.Array], Any], *,
                   batch_size: Optional[int] = None, samples_per_step: Optional[int] = None) -> dict:
  """`fn(x)` of the (transformed, float) input of every op in `paths`, for every calibration sample.

  `fn` maps an input [B, ..., C] to a pytree with leading axis B. Returns {path: pytree [S, N, ...]}.
  One compiled call: a `lax.map` over steps, each a `lax.map` over batches.
  """
  data = _subset(data.validate(), samples_per_step)
  paths = set(paths)
  unknown = paths - set(qm.plan.paths)
  if unknown:
    raise ValueError(f"observe_inputs: unknown op paths {sorted(unknown)}; known: {', '.join(qm.plan.paths)}")
  s, n = data.xs.shape[:2]
  bs = batch_size or n
  if n % bs:
    raise ValueError(f"batch_size={bs} must divide the calibration samples per step ({n})")
  nb = n // bs

  def stat_fn(op, operand, x):
    if op.path not in paths or operand not in ("input", "lhs"):
      return None
    return {"v": fn(x)}

  def one_batch(params, x, t, c):
    tb = jnp.full((x.shape[0],), t)
    _, stats = _float_forward(qm, params, stat_fn, x, tb, c)
    return {p: stats[p]["v"] for p in paths}

  @jax.jit
  def run(params, xs, ts, conds):
    def step(a):
      xb = a[0].reshape((nb, bs) + a[0].shape[1:])
      cb = None if a[2] is None else a[2].reshape((nb, bs) + a[2].shape[1:])
      per = jax.lax.map(lambda b: one_batch(params, b[0], a[1], b[1]), (xb, cb))
      return jax.tree_util.tree_map(lambda v: v.reshape((n,) + v.shape[2:]), per)
    return jax.lax.map(step, (xs, ts, conds))

  return run(qm.params, data.xs, jnp.asarray(data.ts, jnp.float32), data.conds)


def _per_sample_channel_absmax(x):
  axes = tuple(range(1, x.ndim - 1))
  return jnp.max(jnp.abs(x), axis=axes) if axes else jnp.abs(x)


def channel_absmax(qm, data: CalibData, paths: Sequence[str], *, batch_size: Optional[int] = None,
                   samples_per_step: Optional[int] = None) -> dict:
  """Per-sample activation salience s_X[b, j] = max over tokens/pixels of |X[b, ..., j]|: {path: [S, N, C]}."""
  return observe_inputs(qm, data, paths, _per_sample_channel_absmax, batch_size=batch_size,
                        samples_per_step=samples_per_step)


def capture_rows(qm, data: CalibData, paths: Sequence[str], *, samples_per_step: int = 8,
                 max_rows: Optional[int] = 4096, seed: int = 0) -> dict:
  """Raw float inputs of Dense ops as rows [R, C] (tokens of the first `samples_per_step` samples of every
  step, subsampled to at most `max_rows` with a fixed seed): the data of layer-wise output-error searches."""
  got = observe_inputs(qm, data, paths, lambda x: x, samples_per_step=samples_per_step)
  rng = np.random.default_rng(seed)
  out = {}
  for p, v in got.items():
    rows = jnp.reshape(v, (-1, v.shape[-1]))
    if max_rows is not None and rows.shape[0] > max_rows:
      rows = rows[np.sort(rng.choice(rows.shape[0], max_rows, replace=False))]
    out[p] = rows
  return out


# =========================================================================================================
# Salience arithmetic
# =========================================================================================================
def weight_salience(kernels: Sequence[jax.Array]) -> jax.Array:
  """s_W[j] = max over output channels (and over every kernel of a group sharing the input) of |W[.., j, o]|.
  Flax kernels are [..., in, out]: spatial axes are reduced as well."""
  per = [jnp.max(jnp.abs(k.reshape(-1, k.shape[-2], k.shape[-1])), axis=(0, 2)) for k in kernels]
  return jnp.max(jnp.stack(per), axis=0)


def rank(x: jax.Array) -> jax.Array:
  """Ranks along the last axis (average ranks for ties), as scipy.stats.rankdata."""
  return jax.scipy.stats.rankdata(x, method="average", axis=-1)


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman's ρ between `a` [..., C] and `b` [C] (Pearson correlation of ranks), batched over a's rows."""
  ra = rank(a)
  rb = rank(jnp.broadcast_to(b, a.shape))
  ra = ra - jnp.mean(ra, axis=-1, keepdims=True)
  rb = rb - jnp.mean(rb, axis=-1, keepdims=True)
  num = jnp.sum(ra * rb, axis=-1)
  den = jnp.sqrt(jnp.sum(ra ** 2, axis=-1) * jnp.sum(rb ** 2, axis=-1))
  return num / jnp.maximum(den, 1e-12)


def ssc_weights(sx: jax.Array, sw: jax.Array, temperature: float = 1.0) -> jax.Array:
  """PTQ4DiT's Spearman-ρ-guided salience calibration: η = softmax(−ρ/τ) over the rows of `sx` [B, C]
  (samples or timesteps). Rows whose activation salience is *less* correlated with the weight salience
  (complementary outliers) get more weight."""
  rho = spearman(sx, sw)
  return jax.nn.softmax(-rho / temperature)


def balance_factors(act: jax.Array, w: jax.Array, alpha: float = 0.5, beta: Optional[float] = None, *,
                    eps: float = EPS) -> jax.Array:
  """λ_j = s_X,j^α / s_W,j^β (β defaults to 1 − α). Dividing X by λ and multiplying W's input rows by it
  leaves max|X_j/λ_j| ∝ s_X^(1−α)·s_W^β: α = ½ = β is PTQ4DiT's channel-wise salience balance (both
  saliences become √(s_X s_W)); channels with no signal keep λ = 1."""
  beta = 1.0 - alpha if beta is None else beta
  a = jnp.maximum(act, eps)
  ww = jnp.maximum(w, eps)
  lam = a ** alpha / ww ** beta
  lam = jnp.where((act <= eps) | (w <= eps), 1.0, lam)
  return jnp.clip(lam, 1e-4, 1e4)


def alpha_grid(num: int = 21, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """(α, 1 − α) candidates: DiTAS' grid {0, 0.05, …, 1} with num = 21."""
  a = np.linspace(lo, hi, num)
  return np.stack([a, 1.0 - a], axis=1).astype(np.float32)


def svdquant_grid(num_grids: int = 20) -> np.ndarray:
  """SVDQuant's (α, β) candidates: {(0, 0)} ∪ {(a, 0)} ∪ {(a, 1 − a)} for a = 1/n … (n−1)/n."""
  a = np.arange(1, num_grids) / num_grids
  cands = [(0.0, 0.0)] + [(x, 0.0) for x in a] + [(x, 1.0 - x) for x in a]
  return np.asarray(cands, np.float32)


# =========================================================================================================
# Groups of ops sharing an input, and offline folding of their divisor
# =========================================================================================================
@dataclasses.dataclass(frozen=True)
class SmoothGroup:
  """Ops that read the same tensor (so they must share one smoothing divisor) and where it can be folded.

  fold: None (online divide), ('modulation', mod_path, shift_chunk, scale_chunk, num_chunks): the input is
    LN(x)·(1 + scale) + shift with shift/scale produced by the Dense `mod_path` (adaLN); ('producer', path):
    the input is a channel-wise-linear function of the output of Dense `path` (softmax·V for to_out_0).
  kind: 'qkv' | 'proj' | 'fc1' | 'fc2' | 'other'.
  """
  name: str
  paths: tuple[str, ...]
  fold: Optional[tuple] = None
  kind: str = "other"


_DIT_BLOCK = re.compile(r"(.*transformer_blocks_\d+)/(attn1/(to_q|to_k|to_v|to_out_0)|ff/(net_0/proj|net_2))")


def dit_groups(plan: Plan, kinds: Sequence[str] = ("qkv", "proj", "fc1", "fc2"), *,
               only_quantized: bool = True) -> list[SmoothGroup]:
  """The smoothing groups of a diffusers-named DiT: per block, qkv (fold into adaLN shift/scale of the
  attention branch: chunks 0/1 of 6), proj (fold into to_v), fc1 (fold into adaLN chunks 3/4), fc2 (online)."""
  blocks: dict[str, set] = {}
  for op in plan.ops:
    m = _DIT_BLOCK.fullmatch(op.path)
    if m and (op.quantized or not only_quantized):
      blocks.setdefault(m.group(1), set()).add(m.group(2))
  groups = []
  for b, have in blocks.items():
    mod = f"{b}/norm1/linear"
    has_mod = mod in plan
    spec = {
        "qkv": ([f"attn1/{n}" for n in ("to_q", "to_k", "to_v")], ("modulation", mod, 0, 1, 6) if has_mod else None),
        "proj": (["attn1/to_out_0"], ("producer", f"{b}/attn1/to_v")),
        "fc1": (["ff/net_0/proj"], ("modulation", mod, 3, 4, 6) if has_mod else None),
        "fc2": (["ff/net_2"], None),
    }
    for kind in kinds:
      rel, fold = spec[kind]
      present = [r for r in rel if r in have]
      if not present:
        continue
      if kind == "qkv" and len(present) != 3:
        fold = None   # a partly quantized qkv cannot fold one shared divisor into adaLN (the others need it too)
      groups.append(SmoothGroup(f"{b}/{kind}", tuple(f"{b}/{r}" for r in present), fold, kind))
  return groups


def generic_groups(plan: Plan, pattern: str = ".*") -> list[SmoothGroup]:
  """Groups for any model (the text U-Net): self-attention to_q/to_k/to_v share their input, a
  cross-attention's (attn2) to_k/to_v share the text states; every other Dense/Conv is its own group
  (online divisor, no fold). DiT blocks get `dit_groups`' folds."""
  dit = dit_groups(plan)
  taken = {p for g in dit for p in g.paths}
  groups = [g for g in dit if all(re.fullmatch(pattern, p) for p in g.paths)]
  attn: dict[tuple, list] = {}
  singles = []
  for op in plan.ops:
    if op.path in taken or not op.quantized or op.weight is None or op.info.kind not in ("dense", "conv"):
      continue
    if not re.fullmatch(pattern, op.path):
      continue
    m = re.fullmatch(r"(.*/attn(\d))/to_(q|k|v)", op.path)
    if m:
      key = (m.group(1), "q" if (m.group(2) == "2" and m.group(3) == "q") else "kv" if m.group(2) == "2" else "qkv")
      attn.setdefault(key, []).append(op.path)
    else:
      singles.append(SmoothGroup(op.path, (op.path,), None, "other"))
  for (prefix, part), paths in attn.items():
    groups.append(SmoothGroup(f"{prefix}/{part}", tuple(paths), None, "qkv" if part == "qkv" else "other"))
  return groups + singles


def _get(params, key):
  return traverse_util.flatten_dict(params, sep="/")[key]


def _set_many(params, updates: dict):
  flat = traverse_util.flatten_dict(params, sep="/")
  for k, v in updates.items():
    if k not in flat:
      raise KeyError(f"params have no entry {k!r}")
    flat[k] = v
  return traverse_util.unflatten_dict(flat, sep="/")


def kernel_of(qm, path: str) -> jax.Array:
  return qapply.get_kernel(qm.params, path)


def bias_of(qm, path: str) -> Optional[jax.Array]:
  flat = traverse_util.flatten_dict(qm.params, sep="/")
  return flat.get(f"{path}/bias")


def smooth_group(qm, group: SmoothGroup, lam: jax.Array):
  """Apply one divisor λ to every op of a group (online: x/λ, kernel rows ·λ)."""
  for p in group.paths:
    qm = pt.smooth(qm, p, lam)
  return qm


def fold_into_modulation(qm, consumers: Sequence[str], mod_path: str, shift_chunk: int, scale_chunk: int,
                         num_chunks: int = 6):
  """Fold the shared online divisor λ of `consumers` into the adaLN Dense `mod_path` (offline
  re-parameterization of PTQ4DiT / DiTAS): their input is LN(x)(1 + scale) + shift, and
  (LN(x)(1 + scale) + shift)/λ = LN(x)(1 + scale') + shift' with
  shift' = shift/λ (kernel columns and bias /λ) and 1 + scale' = (1 + scale)/λ
  (kernel columns /λ, bias b' = (b + 1 − λ)/λ). Exact in float."""
  lams = [None if qm.qstate.get(p) is None else qm.qstate[p].smooth for p in consumers]
  if any(l is None for l in lams):
    raise ValueError(f"fold_into_modulation: every consumer needs an online smoothing divisor; got none for "
                     f"{[p for p, l in zip(consumers, lams) if l is None]}")
  lam = lams[0]
  for p, l in zip(consumers, lams):
    if l.shape != lam.shape or not bool(jnp.allclose(l, lam, rtol=1e-6)):
      raise ValueError(f"fold_into_modulation: consumers must share one divisor; {p!r} differs from "
                       f"{consumers[0]!r}")
  k = qapply.get_kernel(qm.params, mod_path)
  d = lam.shape[0]
  if k.shape[-1] != num_chunks * d:
    raise ValueError(f"fold_into_modulation: {mod_path!r} has {k.shape[-1]} outputs; expected "
                     f"num_chunks × channels = {num_chunks} × {d}")
  b = bias_of(qm, mod_path)
  if b is None:
    raise ValueError(f"fold_into_modulation: {mod_path!r} has no bias (the scale fold needs one)")
  sh, sc = slice(shift_chunk * d, (shift_chunk + 1) * d), slice(scale_chunk * d, (scale_chunk + 1) * d)
  k, b = jnp.asarray(k), jnp.asarray(b)          # zoo parameters load as numpy arrays
  k = k.at[..., sh].divide(lam).at[..., sc].divide(lam)
  b = b.at[sh].divide(lam).at[sc].set((b[sc] + 1.0 - lam) / lam)
  params = _set_many(qm.params, {f"{mod_path}/kernel": k, f"{mod_path}/bias": b})
  qstate = qm.qstate
  for p in consumers:
    qstate = update_op(qstate, p, smooth=None)
  return qm.replace(params=params, qstate=qstate)


def fold_group(qm, group: SmoothGroup):
  """Fold a smoothed group's divisor offline where `group.fold` says it is exact; otherwise keep it online."""
  if group.fold is None:
    return qm
  if group.fold[0] == "modulation":
    _, mod, sh, sc, n = group.fold
    return fold_into_modulation(qm, group.paths, mod, sh, sc, n)
  if group.fold[0] == "producer":
    prev = group.fold[1]
    st = qm.qstate.get(prev)
    if st is not None and st.lowrank is not None:
      raise ValueError(f"fold_group: fold {group.name!r} into {prev!r} before adding its low-rank branch")
    for p in group.paths:
      qm = pt.fold_smoothing(qm, p, prev)
    return qm
  raise ValueError(f"SmoothGroup.fold kind {group.fold[0]!r} is unknown; accepted: modulation, producer")


def group_kernel(qm, group: SmoothGroup) -> jax.Array:
  """The group's kernels concatenated along outputs: [in, Σ out] (2-D Dense kernels)."""
  ks = [kernel_of(qm, p) for p in group.paths]
  for p, k in zip(group.paths, ks):
    if k.ndim != 2:
      raise ValueError(f"group_kernel: {p!r} has kernel shape {k.shape}; searches accept 2-D Dense kernels")
  return jnp.concatenate(ks, axis=-1)


# =========================================================================================================
# Quantizers used inside searches
# =========================================================================================================
def quantize_weight(kernel: jax.Array, spec: QuantSpec, method: str = "minmax") -> jax.Array:
  """Fake-quantized kernel with parameters from `calibrate.weight_qparams` (pure, jit-able)."""
  return qops.fake_quant(kernel, calibrate.weight_qparams(kernel, spec, method), spec)


def quantize_rows(x: jax.Array, spec: Optional[QuantSpec]) -> jax.Array:
  """Fake-quantize activation rows [R, C] as the op would: dynamic specs per their run-time reduction;
  static specs with min/max parameters over all rows (one calibration-set range)."""
  if spec is None:
    return x
  if spec.dynamic:
    return qops.fake_quant(x, None, spec)
  xg = qops.group_view(x, spec)
  axes = qops.reduce_axes(spec, xg.ndim)
  return qops.fake_quant(x, qops.minmax_params(xg, spec, axes), spec)


def _svd_r(w: jax.Array, rank: int):
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  a = u[:, :rank] * jnp.sqrt(s[:rank])
  b = jnp.sqrt(s[:rank])[:, None] * vt[:rank]
  return a, b


def layer_output_error(x: jax.Array, kernel: jax.Array, lam: jax.Array, w_spec: Optional[QuantSpec],
                       a_spec: Optional[QuantSpec], *, rotation: Optional[jax.Array] = None,
                       lowrank_rank: int = 0, w_method: str = "minmax") -> jax.Array:
  """‖Q_a((X/λ)R)·Q_w(Rᵀ diag(λ) W − L) + (X/λ)R·L − X·W‖² summed over rows: the error of one op (or a
  group's concatenated kernel) under smoothing λ, rotation R and a rank-r float branch L = SVD_r(·)."""
  ref = x @ kernel
  xs = x / lam
  w = kernel * lam[:, None]
  if rotation is not None:
    xs = xs @ rotation
    w = rotation.T @ w
  branch = 0.0
  if lowrank_rank:
    a, b = _svd_r(w, lowrank_rank)
    w = w - a @ b
    branch = (xs @ a) @ b
  wq = w if w_spec is None else quantize_weight(w, w_spec, w_method)
  out = quantize_rows(xs, a_spec) @ wq + branch
  return jnp.sum((out - ref) ** 2)


def search_factors(x: jax.Array, kernel: jax.Array, act_stat: jax.Array, w_stat: jax.Array,
                   candidates: np.ndarray, w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec], *,
                   rotation: Optional[jax.Array] = None, lowrank_rank: int = 0) -> tuple[jax.Array, jax.Array]:
  """Output-error grid search of λ = act^α / w^β over (α, β) `candidates` [K, 2] (one compiled
  `lax.map`, so memory stays one candidate's). Returns (errors [K], best λ)."""
  cands = jnp.asarray(candidates, jnp.float32)
  f = _search_fn(w_spec, a_spec, int(lowrank_rank), rotation is not None)
  errs = f(x, kernel, act_stat, w_stat, cands, rotation)
  best = int(jnp.argmin(errs))
  return errs, balance_factors(act_stat, w_stat, float(cands[best, 0]), float(cands[best, 1]))


_SEARCH_CACHE: dict = {}


def _search_fn(w_spec, a_spec, lowrank_rank, rotated):
  key = (w_spec, a_spec, lowrank_rank, rotated)
  if key not in _SEARCH_CACHE:
    def f(x, kernel, act_stat, w_stat, cands, rotation):
      def one(ab):
        lam = balance_factors(act_stat, w_stat, ab[0], ab[1])
        return layer_output_error(x, kernel, lam, w_spec, a_spec, rotation=rotation, lowrank_rank=lowrank_rank)
      return jax.lax.map(one, cands)
    _SEARCH_CACHE[key] = jax.jit(f)
  return _SEARCH_CACHE[key]


def temporal_absmax(qm, data: CalibData, paths: Sequence[str], *, batch_size: Optional[int] = None) -> dict:
  """DiTAS' temporal-aggregated salience (= ViDiT-Q v2's and SVDQuant's span): max|X_j| over every token,
  sample and timestep of the calibration set. {path: [C]}."""
  stats = channel_absmax(qm, data, paths, batch_size=batch_size)
  return {p: jnp.max(v.reshape(-1, v.shape[-1]), axis=0) for p, v in stats.items()}


def searched_smoothing(qm, data: CalibData, groups: Sequence[SmoothGroup], candidates: np.ndarray, *,
                       rotation: Optional[str] = None, lowrank_rank: int = 0, fold: bool = False,
                       samples_per_step: int = 8, max_rows: Optional[int] = 4096, seed: int = 0,
                       fixed: Optional[tuple] = None):
  """Smooth every group with λ = s_X^α / s_W^β, (α, β) chosen per group by the output error of its own
  quantizers (`search_factors`) on captured float inputs; s_X is the temporal-aggregated max (DiTAS TAS).

  rotation: None, or a `rotation_matrix` kind applied after smoothing (ViDiT-Q's static-dynamic
  balancing: X' = (X/λ)R, W' = Rᵀ diag(λ) W; one R per group, seeded). lowrank_rank: a rank-r SVD branch
  inside the search (SVDQuant's allow_low_rank; DiTAS' LoRA). fold: fold divisors offline where exact
  (not with a rotation). fixed: skip the search and use this (α, β). Only 2-D Dense groups are smoothed.
  Returns (qm, {group name: (α, β)}).
  """
  groups = [g for g in groups if all(kernel_of(qm, p).ndim == 2 for p in g.paths)]
  if not groups:
    return qm, {}
  if rotation is not None and fold:
    raise ValueError("searched_smoothing: fold=True cannot be combined with a rotation (it stays online)")
  first = [g.paths[0] for g in groups]
  act = temporal_absmax(qm, data, first)
  rows = capture_rows(qm, data, first, samples_per_step=samples_per_step, max_rows=max_rows, seed=seed) \
      if fixed is None else None
  chosen = {}
  for i, g in enumerate(groups):
    op = qm.plan[g.paths[0]]
    kernel = group_kernel(qm, g)
    w_stat = weight_salience([kernel])
    rot = None
    if rotation is not None:
      rot = rotation_matrix(rotation, kernel.shape[0], jax.random.fold_in(jax.random.key(seed), i))
    if fixed is not None:
      ab = tuple(float(v) for v in fixed)
      lam = balance_factors(act[g.paths[0]], w_stat, ab[0], ab[1])
    else:
      errs, lam = search_factors(rows[g.paths[0]], kernel, act[g.paths[0]], w_stat, candidates, op.weight,
                                 op.act_spec("input"), rotation=rot, lowrank_rank=lowrank_rank)
      ab = tuple(float(v) for v in np.asarray(candidates)[int(jnp.argmin(errs))])
    qm = smooth_group(qm, g, lam)
    if rot is not None:
      for p in g.paths:
        qm = pt.rotate(qm, p, rot)
    chosen[g.name] = ab
  if fold:
    for g in groups:
      qm = fold_group(qm, g)
  return qm, chosen


# =========================================================================================================
# Low-rank branches
# =========================================================================================================
def alternating_lowrank(w: jax.Array, rank: int, quant_fn: Callable[[jax.Array], jax.Array], *,
                        iters: int = 10, score_fn: Optional[Callable] = None, early_stop: bool = True):
  """Rank-r float branch L = A·B plus quantized residual Q(W − L), refined by alternation:
  L_0 = SVD_r(W); Q_k = q(W − L_k); L_{k+1} = SVD_r(W − Q_k) (SVDQuant; DiTAS' LoftQ-style LoRA is the same
  fixed point). Each iterate is scored by `score_fn(a, b, residual_q)` (default: ‖W − Q − L‖²_F) and the
  best is kept; with `early_stop` the loop ends at the first increase. SVDs in float64 on the host.

  Returns (A [in, r], B [r, out], scores per iteration).
  """
  w64 = np.asarray(w, np.float64)
  if not 1 <= rank <= min(w64.shape):
    raise ValueError(f"alternating_lowrank: rank={rank} is out of range; accepted 1..{min(w64.shape)}")

  def svd_r(m):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vt[:rank]

  def score(a, b, q):
    if score_fn is not None:
      return float(score_fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), q))
    return float(np.sum((w64 - np.asarray(q, np.float64) - a @ b) ** 2))

  a, b = svd_r(w64)
  best, scores = None, []
  for _ in range(max(1, iters)):
    q = quant_fn(jnp.asarray(w64 - a @ b, jnp.float32))
    sc = score(a, b, q)
    scores.append(sc)
    if best is None or sc < best[0]:
      best = (sc, a, b)
    elif early_stop:
      break
    a, b = svd_r(w64 - np.asarray(q, np.float64))
  _, a, b = best
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scores


def set_lowrank(qm, path: str, a: jax.Array, b: jax.Array):
  """Give op `path` the float branch A·B and keep the residual W − A·B as its (to be quantized) kernel."""
  k = kernel_of(qm, path)
  if k.ndim != 2 or a.shape != (k.shape[0], b.shape[0]) or b.shape[1] != k.shape[1]:
    raise ValueError(f"set_lowrank({path!r}): shapes A {a.shape}, B {b.shape} do not fit kernel {k.shape}")
  st = qm.qstate.get(path)
  if st is not None and st.lowrank is not None:
    raise ValueError(f"op {path!r} already has a low-rank branch")
  params = _set_many(qm.params, {f"{path}/kernel": k - a @ b})
  return qm.replace(params=params, qstate=update_op(qm.qstate, path, lowrank=(a, b)))


def set_group_lowrank(qm, group: SmoothGroup, rank: int, quant_fn: Callable, *, iters: int = 10,
                      score_fn: Optional[Callable] = None, early_stop: bool = True):
  """`alternating_lowrank` on the group's concatenated kernel: one shared down-projection A and per-op
  rows of B (SVDQuant's fused-qkv branch). Returns (qm, scores)."""
  w = group_kernel(qm, group)
  a, b, scores = alternating_lowrank(w, rank, quant_fn, iters=iters, score_fn=score_fn, early_stop=early_stop)
  start = 0
  for p in group.paths:
    n = kernel_of(qm, p).shape[-1]
    qm = set_lowrank(qm, p, a, b[:, start:start + n])
    start += n
  return qm, scores


# =========================================================================================================
# Rotations
# =========================================================================================================
ROTATIONS = ("hadamard", "block_hadamard", "kron", "random")


def block_hadamard(n: int, *, max_block: Optional[int] = None) -> np.ndarray:
  """Block-diagonal orthonormal Hadamard I_{n/b} ⊗ H_b with b the largest power of two dividing n (capped
  at `max_block`): a Hadamard-like rotation for sizes that are not powers of two (e.g. 96 = 3 × 32)."""
  if n < 1:
    raise ValueError(f"block_hadamard(n={n}): n must be positive")
  b = n & -n
  if max_block is not None:
    b = min(b, 1 << int(math.log2(max_block)))
  return np.kron(np.eye(n // b, dtype=np.float32), pt.hadamard(b)).astype(np.float32)


def rotation_matrix(kind: str, n: int, key: jax.Array) -> jax.Array:
  """An orthogonal n×n matrix.

  'hadamard': Sylvester Hadamard (n a power of two, else an error); 'block_hadamard': `block_hadamard`
  with random ±1 column signs (QuaRot's randomized Hadamard, blockwise); 'kron': H_b ⊗ Q_m with a random
  orthogonal Q_m (m = n/b; mixes all channels); 'random': a random orthogonal matrix."""
  if kind not in ROTATIONS:
    raise ValueError(f"rotation kind {kind!r} is unknown; accepted values: {', '.join(ROTATIONS)}")
  if kind == "hadamard":
    return jnp.asarray(pt.hadamard(n))
  if kind == "random":
    return pt.random_orthogonal(n, key)
  b = n & -n
  if kind == "kron":
    m = n // b
    q = np.asarray(pt.random_orthogonal(m, key)) if m > 1 else np.ones((1, 1), np.float32)
    return jnp.asarray(np.kron(q, pt.hadamard(b)), jnp.float32)
  signs = np.asarray(jax.random.rademacher(key, (n,), jnp.float32))
  return jnp.asarray(signs[:, None] * block_hadamard(n), jnp.float32)


# =========================================================================================================
# Plan helpers
# =========================================================================================================
def _axis_size(op: OpPlan, spec: QuantSpec, which: str) -> Optional[int]:
  if which == "weight":
    shape = op.info.weight_shape
  else:
    shape = op.info.input_shapes[op.info.operands.index(which)]
  if not shape:
    return None
  return shape[spec.axis]


def fit_group_sizes(plan: Plan) -> Plan:
  """Replace every group size that does not divide its axis by the largest common divisor (gcd), so one
  rule set fits every layer width (e.g. group 32 on a 4-channel patch embedding becomes 4)."""
  for op in plan.ops:
    changes = {}
    if op.weight is not None and op.weight.granularity == "group":
      n = _axis_size(op, op.weight, "weight")
      if n and n % op.weight.group_size:
        changes["weight"] = op.weight.replace(group_size=math.gcd(n, op.weight.group_size))
    acts, changed = [], False
    for name, spec in op.acts:
      if spec.granularity == "group":
        n = _axis_size(op, spec, name)
        if n and n % spec.group_size:
          spec, changed = spec.replace(group_size=math.gcd(n, spec.group_size)), True
      acts.append((name, spec))
    if changed:
      changes["acts"] = tuple(acts)
    if changes:
      plan = plan.replace_op(op.path, **changes)
  return plan


# --- rules --------------------------------------------------------------------------------------------
SKIP = {
    "dit": {"embed": r".*norm1/emb/.*", "adaln": r".*norm1/linear|proj_out_1",
            "first_last": r"pos_embed/proj|proj_out_2"},
    "unet": {"embed": r"time_embedding/.*|.*time_emb_proj", "adaln": r"(?!)", "first_last": r"conv_in|conv_out"},
    "unet_text": {"embed": r"time_embedding/.*|.*time_emb_proj", "adaln": r"(?!)",
                  "first_last": r"conv_in|conv_out"},
}
BLOCK_LINEARS = r"(.*/)?transformer_blocks_\d+/(attn\d/(to_q|to_k|to_v|to_out_0)|ff/(net_0/proj|net_2))"


def skip_patterns(family: str, parts: Sequence[str]) -> tuple[str, ...]:
  """Regexes of the layers a paper leaves in float: 'embed' (timestep/class embedders), 'adaln' (the
  modulation Dense layers and the final layer's), 'first_last' (patch embedding / final projection)."""
  if family not in SKIP:
    raise ValueError(f"model family {family!r} is unknown; accepted values: {', '.join(SKIP)}")
  bad = [p for p in parts if p not in SKIP[family]]
  if bad:
    raise ValueError(f"skip parts {bad} are unknown; accepted values: {', '.join(SKIP[family])}")
  return tuple(SKIP[family][p] for p in parts)


def build_rules(w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec], *, keep_fp: Sequence[str] = (),
                weight_only: Sequence[str] = (), only: Optional[str] = None,
                matmul_act: Optional[QuantSpec] = None, softmax_act: Optional[QuantSpec] = None,
                act_overrides: Sequence[tuple[str, QuantSpec]] = ()) -> list:
  """The rule list of a DiT method: float layers first, then weight-only layers, attention matmuls (both
  operands at `matmul_act`, the softmax operand at `softmax_act`; None = float), per-pattern activation
  overrides, and finally every Dense/Conv (or only those matching `only`) at (w_spec, a_spec)."""
  from dqjax.transform.rules import Rule
  rules = [Rule(pattern=p, keep_fp=True) for p in keep_fp]
  rules += [Rule(pattern=p, weight=w_spec, kinds=("dense", "conv")) for p in weight_only]
  if matmul_act is None and softmax_act is None:
    rules.append(Rule(pattern=".*", keep_fp=True, kinds=("matmul",)))
  else:
    rules.append(Rule(pattern=r".*sv_matmul", act=matmul_act, act_lhs=softmax_act, kinds=("matmul",)))
    rules.append(Rule(pattern=".*", act=matmul_act, kinds=("matmul",)))
  rules += [Rule(pattern=p, weight=w_spec, act=s, kinds=("dense", "conv", "conv_transpose"))
            for p, s in act_overrides]
  if only is not None:
    rules.append(Rule(pattern=only, weight=w_spec, act=a_spec, kinds=("dense", "conv", "conv_transpose")))
    rules.append(Rule(pattern=".*", keep_fp=True))
  else:
    rules.append(Rule(pattern=".*", weight=w_spec, act=a_spec, kinds=("dense", "conv", "conv_transpose")))
  return rules


def fit_groups_pass():
  """Pass: `fit_group_sizes` on the QModel's plan."""
  def run(qm, data):
    return qm.replace(plan=fit_group_sizes(qm.plan))
  return run


# =========================================================================================================
# Candidate evaluation
# =========================================================================================================
METRICS = ("eps", "guidance")


def _paired(data: CalibData) -> bool:
  """CFG calibration batches are [x; x] with [cond; null]: the guidance direction is out[:n] − out[n:]."""
  n = data.num_samples
  return data.conds is not None and n % 2 == 0 and bool(jnp.all(data.xs[:, : n // 2] == data.xs[:, n // 2:]))


def _metric_values(out, ref, metrics, paired):
  vals = {}
  for m in metrics:
    if m == "eps":
      vals[m] = jnp.mean((out - ref) ** 2)
    else:
      if not paired:
        vals[m] = jnp.mean((out - ref) ** 2)
      else:
        h = out.shape[0] // 2
        vals[m] = jnp.mean(((out[:h] - out[h:]) - (ref[:h] - ref[h:])) ** 2)
  return vals


def _check_metrics(metrics):
  for m in metrics:
    if m not in METRICS:
      raise ValueError(f"metric {m!r} is unknown; accepted values: {', '.join(METRICS)}")


def paired_subset(data: CalibData, samples_per_step: Optional[int]) -> CalibData:
  """A subset that keeps CFG pairs together: the first k conditional samples and their null twins."""
  data = data.validate()
  n = data.num_samples
  if samples_per_step is None or samples_per_step >= n:
    return data
  k = int(samples_per_step)
  if _paired(data):
    h = n // 2
    kk = max(1, k // 2)
    idx = np.concatenate([np.arange(kk), h + np.arange(kk)])
  else:
    idx = np.arange(k)
  pick = lambda a: None if a is None else a[:, idx]
  return CalibData(data.xs[:, idx], data.ts, pick(data.conds), data.step_index)


def model_error_fn(qm, data: CalibData, *, samples_per_step: Optional[int] = 16,
                   metrics: Sequence[str] = ("eps",)) -> Callable:
  """A compiled `f(params, qstate) -> {metric: value}`: the quantized denoiser's error against the float
  model over calibration inputs (mean over steps). qstate is traced, so candidates that differ only in
  arrays (ranges, smoothing factors, low-rank branches) reuse one compilation.

  metrics: 'eps' (mean squared error of the output) and 'guidance' (error of the CFG direction
  ε(c) − ε(∅) when the batch holds [cond; null] pairs, else the same as 'eps')."""
  _check_metrics(metrics)
  sub = paired_subset(data, samples_per_step)
  paired = _paired(sub)
  model, plan = qm.model, qm.plan
  ts = jnp.asarray(sub.ts, jnp.float32)
  refs = jax.jit(lambda p, xs, ts, cs: jax.lax.map(
      lambda a: model.apply({"params": p}, a[0], jnp.full((a[0].shape[0],), a[1]), a[2]), (xs, ts, cs)))(
          qm.fp_params, sub.xs, ts, sub.conds)

  @jax.jit
  def f(params, qstate):
    def step(a):
      tb = jnp.full((a[0].shape[0],), a[1])
      out = qapply.quantized_apply(model, plan, params, qstate, a[0], tb, a[2], t=tb)
      return _metric_values(out, a[3], metrics, paired)
    vals = jax.lax.map(step, (sub.xs, ts, sub.conds, refs))
    return {k: jnp.mean(v) for k, v in vals.items()}

  return f


@dataclasses.dataclass(frozen=True)
class OpVariants:
  """The quantizer choices of one op for a variant evaluation: each choice is (weight spec or None = float,
  activation spec: None = float, a dynamic QuantSpec for every operand, or a tuple of (operand, spec))."""
  choices: tuple

  def act_specs(self, k: int, operands) -> dict:
    a = self.choices[k][1]
    if a is None:
      return {o: None for o in operands}
    if isinstance(a, QuantSpec):
      return {o: a for o in operands}
    return {o: dict(a).get(o) for o in operands}


def _variant_kernels(qm, path: str, var: OpVariants, w_method: str) -> Optional[jax.Array]:
  op = qm.plan[path]
  if op.info.weight_shape is None:
    return None
  st = qm.qstate.get(path, OpState())
  k = qapply.effective_kernel(kernel_of(qm, path), st)
  ks = []
  for w_spec, _ in var.choices:
    ks.append(k if w_spec is None else quantize_weight(k, w_spec, w_method))
  return jnp.stack(ks)


def variant_error_fn(qm, data: CalibData, variants: dict, *, samples_per_step: Optional[int] = 16,
                     metrics: Sequence[str] = ("eps",), w_method: str = "minmax") -> Callable:
  """A compiled `f(choice) -> {metric: value}` where `choice` maps every op path of `variants`
  ({path: OpVariants}) to an int32 index. Weights of every choice are quantized once here (minmax, or
  `w_method`) and stacked; activations of the chosen dynamic spec are fake-quantized under `lax.switch`.
  Ops outside `variants` run as the QModel's plan says (they must be calibrated). One compilation serves
  every combination of choices: Q-DiT's evolutionary search and ViDiT-Q's sensitivity sweeps.
  """
  _check_metrics(metrics)
  for path, var in variants.items():
    if path not in qm.plan:
      raise ValueError(f"variant_error_fn: unknown op path {path!r}")
    for w, a in var.choices:
      specs = [a] if isinstance(a, QuantSpec) else ([] if a is None else [s for _, s in a])
      for s in specs:
        if s is not None and not s.dynamic:
          raise ValueError(f"variant_error_fn: op {path!r} has a static activation spec {s.short()} among its "
                           "choices; accepted: dynamic specs or None (static ones need calibration)")
  core_plan = qm.plan
  for path in variants:
    core_plan = core_plan.replace_op(path, weight=None, acts=())
  stacked = {p: _variant_kernels(qm, p, v, w_method) for p, v in variants.items()}
  stacked = {p: k for p, k in stacked.items() if k is not None}
  sub = paired_subset(data, samples_per_step)
  paired = _paired(sub)
  model = qm.model
  ts = jnp.asarray(sub.ts, jnp.float32)
  refs = jax.jit(lambda p, xs, ts, cs: jax.lax.map(
      lambda a: model.apply({"params": p}, a[0], jnp.full((a[0].shape[0],), a[1]), a[2]), (xs, ts, cs)))(
          qm.fp_params, sub.xs, ts, sub.conds)
  base_params = qapply.quantized_params(core_plan, qm.params, qm.qstate)
  qstate = qm.qstate

  def interceptor_for(choice, t):
    core = qapply.make_interceptor(core_plan, qstate, t)

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != "__call__" or op_kind(context.module) is None:
        return next_fun(*args, **kwargs)
      path = module_path(context.module)
      if path not in variants:
        return core(next_fun, args, kwargs, context)
      op = qm.plan[path]
      st = qstate.get(path, OpState())
      n = len(op.info.operands)
      xs = qapply.transform_inputs(list(args[:n]), st)
      branch_in = xs[0]
      var = variants[path]
      new = []
      for name, x in zip(op.info.operands, xs):
        fns = []
        for k in range(len(var.choices)):
          s = var.act_specs(k, op.info.operands)[name]
          fns.append((lambda v: v) if s is None else (lambda v, s=s: qops.fake_quant(v, None, s)))
        new.append(jax.lax.switch(choice[path], fns, x))
      return qapply.with_lowrank_branch(next_fun(*new, *args[n:], **kwargs), branch_in, st)

    return interceptor

  @jax.jit
  def f(choice):
    params = qapply.replace_kernels(base_params, {p: k[choice[p]] for p, k in stacked.items()})

    def step(a):
      tb = jnp.full((a[0].shape[0],), a[1])
      with nn.intercept_methods(interceptor_for(choice, tb)):
        out = model.apply({"params": params}, a[0], tb, a[2])
      return _metric_values(out, a[3], metrics, paired)

    vals = jax.lax.map(step, (sub.xs, ts, sub.conds, refs))
    return {k: jnp.mean(v) for k, v in vals.items()}

  def call(choice: dict):
    missing = set(variants) - set(choice)
    if missing:
      raise ValueError(f"variant choice misses op paths {sorted(missing)}")
    return f({p: jnp.asarray(choice[p], jnp.int32) for p in variants})

  call.compiled = f
  return call
