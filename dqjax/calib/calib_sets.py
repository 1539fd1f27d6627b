"""Timestep-aware calibration sets: the FP model's own trajectory, and sets with a chosen number of samples
per sampler step.

Calibration-strategy papers differ only in how many samples they take from each step (Q-Diffusion: evenly
spaced steps; PTQ4DM: steps drawn from a normal distribution; EDA-DM: density/diversity weights; APQ-DM:
steps matching the full distribution). They all need the *whole* FP trajectory, so when a recipe runs with a
`DiffusionEnv` the trajectory is regenerated here with the model's own sampler (the exact (x_t, t, cond)
inputs the network receives, CFG batches included); without one, the data handed to the recipe is taken as
the trajectory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib.data import CalibData, from_trajectory


def _null_batch(null, n: int):
  def one(a):
    a = jnp.asarray(a)
    return jnp.broadcast_to(a, (n,) + a.shape[1:]) if a.ndim and a.shape[0] == 1 else jnp.broadcast_to(
        a, (n,) + a.shape)
  return jax.tree_util.tree_map(one, null)


def fp_trajectory(qm, num_samples: int, *, seed: Optional[int] = None) -> CalibData:
  """All steps of FP sampling trajectories of `num_samples` fresh noises (needs `qm.env`).

  For classifier-free guidance the network sees [x; x] with [cond; null]: the data holds both halves."""
  env = qm.env
  if env is None:
    raise ValueError("fp_trajectory needs the recipe's DiffusionEnv (qm.env); pass env= to the recipe")
  from dqjax.diffusion import guidance, samplers
  seed = env.seed if seed is None else seed
  k_noise, k_cond, k_run = jax.random.split(jax.random.key(seed + 7919), 3)
  x = jax.random.normal(k_noise, (num_samples,) + tuple(env.sample_shape))
  conds = None if env.cond_sampler is None else env.cond_sampler(k_cond, num_samples)
  denoise = lambda xx, t, c: qm.model.apply({"params": qm.fp_params}, xx, t, c)
  scale = float(env.guidance_scale)
  cfg = env.sampler
  in_sampler = float(getattr(cfg, "guidance_scale", 1.0)) != 1.0
  guided = conds is not None and env.null_cond is not None and (scale != 1.0 or in_sampler)
  if guided and not in_sampler:
    denoise = guidance.classifier_free_guidance(denoise, scale, env.null_cond)
  kw = {"null_cond": env.null_cond} if in_sampler else {}
  res = jax.jit(lambda xx, c, k: samplers.sample(denoise, env.schedule, cfg, xx, k, c, return_trajectory=True,
                                                 **kw))(x, conds, k_run)
  xs = res.trajectory.xs
  model_conds = conds
  if guided:
    model_conds = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], 0), conds,
                                         _null_batch(env.null_cond, num_samples))
    xs = jnp.concatenate([xs, xs], axis=1)
  return from_trajectory(xs, res.trajectory.ts, model_conds)


def trajectory_for(qm, data: CalibData, num_samples: Optional[int]) -> CalibData:
  """The full FP trajectory: regenerated with `num_samples` noises when the recipe has an env, else `data`
  (taken to be the trajectory already)."""
  if qm is None or qm.env is None or not num_samples:
    return data
  return fp_trajectory(qm, int(num_samples))


def counts_from_weights(weights: Sequence[float], total: int) -> np.ndarray:
  """Integer counts proportional to `weights` that sum to `total` (largest remainders get the rest)."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"step weights must be finite, non-negative and not all zero; got {w.tolist()}")
  exact = w / w.sum() * total
  counts = np.floor(exact).astype(int)
  rest = total - counts.sum()
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:rest]] += 1
  return counts


def from_step_counts(data: CalibData, counts: Sequence[int], *, chunk: int = 8, seed: int = 0) -> CalibData:
  """A calibration set with `counts[s]` samples from step s of `data` (a trajectory [S, B, ...]).

  CalibData entries hold equally many samples, so counts are taken in units of `chunk` samples (rounded,
  keeping the total): an entry is `chunk` distinct samples of one step (drawn without replacement, cycling
  through the step's B samples when a step needs more than B). Entries repeat a step's timestep, so static
  calibration and reconstruction simply see that step more often.
  """
  counts = np.asarray(counts, np.int64)
  s, b = data.num_steps, data.num_samples
  if counts.shape != (s,) or np.any(counts < 0) or counts.sum() <= 0:
    raise ValueError(f"counts must be {s} non-negative integers (one per step) with a positive sum; got "
                     f"{counts.tolist()}")
  chunk = int(min(chunk, b))
  units = counts_from_weights(counts.astype(np.float64), max(1, int(round(counts.sum() / chunk))))
  rng = np.random.default_rng(seed)
  steps, rows = [], []
  for step, u in enumerate(units):
    if u == 0:
      continue
    need = int(u) * chunk
    order = np.concatenate([rng.permutation(b) for _ in range(-(-need // b))])[:need]
    for j in range(int(u)):
      steps.append(step)
      rows.append(order[j * chunk:(j + 1) * chunk])
  steps = np.asarray(steps)
  rows = np.stack(rows)
  pick = lambda a: None if a is None else jnp.asarray(a)[steps[:, None], rows]
  step_index = None if data.step_index is None else jnp.asarray(data.step_index)[steps]
  return CalibData(pick(data.xs), jnp.asarray(data.ts)[steps], pick(data.conds), step_index).validate()


def step_histogram(data: CalibData, trajectory_ts: Sequence[float]) -> np.ndarray:
  """How many samples of `data` come from each timestep of a trajectory (for tests and reports)."""
  ts = np.asarray(trajectory_ts)
  out = np.zeros(len(ts), np.int64)
  for t in np.asarray(data.ts):
    out[int(np.argmin(np.abs(ts - t)))] += data.num_samples
  return out
