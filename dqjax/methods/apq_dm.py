"""APQ-DM: Towards Accurate Post-training Quantization for Diffusion Models (Wang et al., CVPR 2024; arXiv
2305.18723, whose first version was titled ADP-DM; ChangyuanWang17/APQ-DM, DDIM CIFAR/CelebA only).

Implemented:
- distribution-aware timestep grouping: the FP trajectory's steps are described by the activation ranges of
  every quantized operand (min and max per step, normalised per operand), and partitioned into
  `num_groups` *contiguous* groups of steps minimising the within-group spread (exact dynamic programming
  over segmentations); each group gets one set of activation parameters (a 'groups' timestep table whose
  boundaries fall between the groups' timesteps), looked up inside the compiled sampler;
- calibration-step selection by distribution matching: `calib_steps` steps are chosen so that their
  features match the whole trajectory's in maximum mean discrepancy (RBF kernel, median bandwidth):
  first the most central step of every group (each group needs data), then greedily the step that lowers
  the MMD most — the structural-risk-minimisation selection of the paper in its simplest form;
- weights per-channel (MSE search), activations per-tensor Lp(2.4)-searched per group.

Deliberate deviations: the paper learns the group assignment by differentiable search (softmax importance
weights with an entropy regulariser) and the released code mixes 8 per-channel group quantizers per step;
here the assignment is the exact optimum of a contiguous segmentation of range features, which gives the
same kind of table (one scale per group of steps) without training. The MMD selection replaces the paper's
SRM objective (empirical risk + MMD) by its MMD term.
"""
from __future__ import annotations

import numpy as np

from dqjax.calib import calibrate
from dqjax.calib.calib_sets import trajectory_for
from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import tables


def range_features(qm, traj: CalibData, *, batch_size=None) -> np.ndarray:
  """[S, F]: per step, every static activation operand's (min, max), each scaled by its largest |value|
  over the steps (so every operand weighs the same)."""
  ranges = calibrate.activation_ranges(qm, traj, batch_size=batch_size)
  cols = []
  for path in sorted(ranges):
    for name in sorted(ranges[path]):
      lo, hi = (np.asarray(a, np.float64).reshape(traj.num_steps, -1) for a in ranges[path][name])
      scale = max(np.abs(lo).max(), np.abs(hi).max(), 1e-12)
      cols += [lo / scale, hi / scale]
  if not cols:
    raise ValueError("APQ-DM needs activation quantizers to describe the steps; the plan has none")
  return np.concatenate(cols, axis=1)


def contiguous_groups(features, num_groups: int) -> np.ndarray:
  """Labels [S] (0 for the first steps, non-decreasing) of the segmentation of the step sequence into
  `num_groups` contiguous groups with the least total within-group squared deviation (exact DP)."""
  f = np.asarray(features, np.float64)
  s = f.shape[0]
  if not 1 <= num_groups <= s:
    raise ValueError(f"num_groups={num_groups} is out of range; accepted: 1..{s} (number of steps)")
  csum = np.concatenate([np.zeros((1, f.shape[1])), np.cumsum(f, 0)])
  csq = np.concatenate([np.zeros(1), np.cumsum((f ** 2).sum(1))])

  def cost(i, j):  # steps i..j-1
    n = j - i
    m = csum[j] - csum[i]
    return csq[j] - csq[i] - (m ** 2).sum() / n

  inf = float("inf")
  best = np.full((num_groups + 1, s + 1), inf)
  arg = np.zeros((num_groups + 1, s + 1), int)
  best[0, 0] = 0.0
  for g in range(1, num_groups + 1):
    for j in range(g, s + 1):
      for i in range(g - 1, j):
        v = best[g - 1, i] + cost(i, j)
        if v < best[g, j] - 1e-12:
          best[g, j], arg[g, j] = v, i
  labels = np.zeros(s, int)
  j = s
  for g in range(num_groups, 0, -1):
    i = arg[g, j]
    labels[i:j] = g - 1
    j = i
  return labels


def group_table(step_ts, labels) -> tables.TableSpec:
  """The 'groups' TableSpec for contiguous step groups (step_ts in sampling order): each boundary lies
  midway between the timesteps of two neighbouring groups."""
  ts = np.asarray(step_ts, np.float64)
  labels = np.asarray(labels)
  bounds = []
  for g in range(labels.max()):
    lo_side = ts[labels == g + 1].max()      # the later group has the lower timesteps
    hi_side = ts[labels == g].min()
    if not lo_side < hi_side:
      raise ValueError("timestep groups must be contiguous in t; got overlapping groups")
    bounds.append(int(np.floor((lo_side + hi_side) / 2)) + 1)
  return tables.TableSpec("groups", tuple(sorted(bounds)))


def _rbf(a, b, bw):
  d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
  return np.exp(-d2 / (2 * bw ** 2))


def mmd_select(features, labels, k: int) -> np.ndarray:
  """k step indices whose features match all steps' in MMD, with at least one step of every group."""
  f = np.asarray(features, np.float64)
  s = f.shape[0]
  groups = np.unique(labels)
  k = int(min(max(k, len(groups)), s))
  d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
  bw = np.sqrt(np.median(d2[d2 > 0]) / 2) if np.any(d2 > 0) else 1.0
  kern = _rbf(f, f, bw)
  target = kern.mean(1)                           # <phi(step), mean embedding of all steps>
  chosen = [int(np.flatnonzero(labels == g)[np.argmin(d2[np.ix_(labels == g, labels == g)].sum(1))])
            for g in groups]

  def mmd(sel):
    sel = np.asarray(sel)
    return kern[np.ix_(sel, sel)].mean() - 2 * target[sel].mean()

  while len(chosen) < k:
    rest = [i for i in range(s) if i not in chosen]
    chosen.append(min(rest, key=lambda i: mmd(chosen + [i])))
  return np.sort(np.asarray(chosen))


def grouped_calibration_pass(config):
  """Pass: group the steps, select calibration steps, calibrate activations with one entry per group."""
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data: CalibData):
    traj = trajectory_for(qm, data, get("traj_samples", 32))
    feats = range_features(qm, traj, batch_size=get("calib_batch", None))
    labels = contiguous_groups(feats, min(int(get("num_groups", 4)), traj.num_steps))
    spec = group_table(np.asarray(traj.ts), labels)
    chosen = mmd_select(feats, labels, int(get("calib_steps", 10)))
    sel = traj.select_steps(chosen)
    qm = calibrate.calibrate_activations(qm, sel, get("act_init", "mse"), table=spec, p=2.4,
                                         batch_size=get("calib_batch", None))
    return qm.replace(meta={**qm.meta, "apq_groups": labels.tolist(), "apq_boundaries": list(spec.boundaries),
                            "apq_steps": chosen.tolist()})

  return run


@register("apq_dm", family="unet_ptq/temporal", model_families=("unet",),
          paper="APQ-DM (CVPR 2024, arXiv 2305.18723)")
def apq_dm(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rules = rules_from_config(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True)
  passes = [common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0), grouped_calibration_pass(config)]

  def run(qm, data):
    for p in passes:
      qm = p(qm, data)
    return qm

  return Recipe("apq_dm", "unet_ptq/temporal", rules, run,
                "contiguous timestep groups of similar activation ranges (one scale per group) + "
                "MMD-matched calibration-step selection")
