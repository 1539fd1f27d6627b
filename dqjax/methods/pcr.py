"""PCR: Post-training Quantization for Text-to-Image Diffusion Models with Progressive Calibration and
Activation Relaxing (Tang et al., ECCV 2024; arXiv 2311.06322; no public code; in the survey's SD table).

Implemented:
- progressive calibration: activation quantizers are time-aware (one table entry per sampler step) and are
  calibrated in sampling order on the inputs the *quantized* model actually produces: the steps are split
  into `num_stages` consecutive groups; stage g runs the quantized sampler with the tables of the stages
  before it already final and re-calibrates the entries of stage g (and, as a starting point, of the later
  ones) on that trajectory, so every step's quantizers see the accumulated quantization error of the steps
  before it. Stage 0 calibrates on the FP trajectory. `num_stages` equal to the number of sampler calls is
  the paper's step-by-step procedure;
- activation relaxing: the most sensitive steps — the `relax_fraction` of sampler calls with the largest
  relative quantization error ‖ε_q − ε_fp‖²/‖ε_fp‖² measured side by side along FP trajectories — run their
  activations at `relax_bits` (≥ 16: float; otherwise tables calibrated at those bits), a per-timestep
  choice inside the compiled sampler (`_act_extra`), at a cost proportional to the few relaxed steps;
- base: the core's MSE-searched PTQ with the attention matmuls quantized (q, k, v and the softmax at the
  activation bits).

Deviations (no code is public; the details are our reading of the paper [paper summary]): sensitive steps are
found by the measured per-step error rather than a fixed list of early/late steps; the default stage count is
CPU-sized (`paper_num_stages` = every step); each stage re-runs the core's Lp(2.4) range search (the paper's
calibration follows Q-Diffusion's, with reconstruction); relaxed steps keep float activations by default.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dqjax.calib import calibrate
from dqjax.calib import noise_stats as ns
from dqjax.methods import common
from dqjax.methods._act_extra import flags_to_timesteps, set_step_precision
from dqjax.methods._correction import base_rules, stats_samples, stats_seed
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform.state import ActQuant

PER_STEP = tables.TableSpec("per_step")


def quantized_sampler(qm):
  """Jitted `(params, qstate, x_T, conds, key) -> SampleOutput`: one compilation for every qstate."""
  env = ns._require_env(qm)
  from dqjax.diffusion import samplers
  cfg = ns._plain_sampler(env.sampler)
  model, plan = qm.model, qm.plan

  @jax.jit
  def run(params, qstate, x, conds, key):
    denoise = lambda xx, t, c: qapply.quantized_apply(model, plan, params, qstate, xx, t, c, t=t)
    return samplers.sample(ns.guided(qm, denoise, conds), env.schedule, cfg, x, key, conds, return_trajectory=True)

  return run


def merge_entries(old, new, mask: np.ndarray):
  """`old` with the activation table entries selected by `mask` [E] taken from `new` (same plan)."""
  m = jnp.asarray(mask)
  qstate = dict(old.qstate)
  for path, st in old.qstate.items():
    nst = new.qstate[path]
    acts = {}
    for name, act in st.acts.items():
      pick = lambda a, b: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), b, a) if a.shape[:1] == m.shape else a
      qp = jax.tree_util.tree_map(pick, act.qp, nst.acts[name].qp)
      acts[name] = ActQuant(qp, act.index)
    qstate[path] = st.replace(acts=acts)
  return old.replace(qstate=qstate)


def progressive_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    if qm.meta.get("a_bits", 8) >= 16:
      return qm
    method, bs = get("act_init", "mse"), get("calib_batch", None)
    calib = lambda q, d: calibrate.calibrate_activations(q, d, method, table=PER_STEP, p=2.4, batch_size=bs)
    if qm.env is None:                      # no sampler to run: plain time-aware calibration on the data
      return calib(qm, data)
    n, seed = int(get("traj_samples", 16)), stats_seed(config, qm)
    x, conds, key = ns.initial_state(qm, n, seed)
    fp = ns.sample_fn(qm, qm.denoiser("fp"))(x, conds, key)
    ts = fp.trajectory.ts
    qm = calib(qm, ns.as_calib_data(qm, fp.trajectory.xs, ts, conds))
    s = int(ts.shape[0])
    stages = [g for g in np.array_split(np.arange(s), max(1, min(int(get("num_stages", 4)), s))) if len(g)]
    sampler = quantized_sampler(qm)
    for g in tqdm(stages[1:], desc="PCR stages", unit="stage", leave=False):
      out = sampler(qm.params, qm.qstate, x, conds, key)
      new = calib(qm, ns.as_calib_data(qm, out.trajectory.xs, ts, conds))
      qm = merge_entries(qm, new, np.arange(s) >= g[0])
    return qm.replace(meta={**qm.meta, "pcr_stages": [int(g[0]) for g in stages]})

  return run


def relax_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    bits, frac = int(get("relax_bits", 16)), float(get("relax_fraction", 0.1))
    if qm.meta.get("a_bits", 8) >= min(bits, 16) or frac <= 0 or qm.env is None:
      return qm
    pairs = ns.collect(qm, stats_samples(config, 32), seed=stats_seed(config, qm))
    err = np.asarray(ns.relative_error(pairs.eps_fp, pairs.delta))
    k = max(1, int(round(frac * len(err))))
    flags = np.zeros(len(err), bool)
    flags[np.argsort(-err, kind="stable")[:k]] = True
    hi_qm = None
    if bits < 16:
      hi_plan = qm.plan
      for op in qm.plan.ops:
        if op.acts:
          hi_plan = hi_plan.with_specs(op.path, acts=tuple((nm, sp.replace(bits=bits)) for nm, sp in op.acts))
      x, conds, key = ns.initial_state(qm, int(get("traj_samples", 16)), stats_seed(config, qm))
      fp = ns.sample_fn(qm, qm.denoiser("fp"))(x, conds, key)
      hi_qm = calibrate.calibrate_activations(qm.replace(plan=hi_plan),
                                              ns.as_calib_data(qm, fp.trajectory.xs, fp.trajectory.ts, conds),
                                              get("act_init", "mse"), table=PER_STEP, p=2.4)
    out = set_step_precision(qm, hi_qm, flags_to_timesteps(flags, pairs.ts, qm.num_train_timesteps), bits)
    return out.replace(meta={**out.meta, "pcr_relaxed_t": np.asarray(pairs.ts)[flags].tolist(),
                             "pcr_step_error": err.tolist()})

  return run


@register("pcr", family="unet_ptq/text_image", model_families=("unet_text",), paper="PCR (arXiv 2311.06322)")
def pcr(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True)
  weights = [common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0)]
  return Recipe("pcr", "unet_ptq/text_image", rules, chain(*weights, progressive_pass(config), relax_pass(config)),
                "time-aware activation tables calibrated progressively on the quantized model's own trajectory; "
                "the most error-sensitive steps relaxed to higher-precision activations")
