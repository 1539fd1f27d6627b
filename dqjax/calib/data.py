"""Calibration data: the exact (x_t, t, cond) inputs the FP model sees along its own sampling trajectories.

Every U-Net/DiT PTQ paper calibrates on samples from the FP model's reverse process; they differ in which
steps they keep. `CalibData` is step-major ([S, N, ...]) so that per-timestep statistics (tables) are a map
over its first axis, and selection policies are pure functions of the trajectory.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SELECTIONS = ("all", "uniform", "normal", "random")


@struct.dataclass
class CalibData:
  """Model inputs grouped by sampler step.

  xs: [S, N, ...] noisy inputs x_t; ts: [S] model timesteps; conds: [S, N, ...] or None (the conditioning
  the denoiser received, already including any CFG null entries); step_index: [S] sampler step indices.
  """
  xs: jax.Array
  ts: jax.Array
  conds: Optional[jax.Array] = None
  step_index: Optional[jax.Array] = None

  @property
  def num_steps(self) -> int:
    return int(self.xs.shape[0])

  @property
  def num_samples(self) -> int:
    return int(self.xs.shape[1])

  def validate(self) -> "CalibData":
    """Raise a clear error for NaN/inf inputs, which would silently poison every range."""
    for name in ("xs", "ts", "conds"):
      a = getattr(self, name)
      if a is None or not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
        continue
      arr = np.asarray(a)
      if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"calibration data field {name!r} contains {bad} NaN/inf values; "
                         "calibration needs finite inputs")
    if self.xs.ndim < 2 or jnp.asarray(self.ts).shape != (self.xs.shape[0],):
      raise ValueError(f"calibration data shapes do not fit: xs {tuple(self.xs.shape)} must be [S, N, ...] "
                       f"and ts {tuple(jnp.asarray(self.ts).shape)} must be [S]")
    return self

  def select_steps(self, idx) -> "CalibData":
    idx = np.asarray(idx)
    pick = lambda a: None if a is None else jnp.asarray(a)[idx]
    return CalibData(self.xs[idx], jnp.asarray(self.ts)[idx], pick(self.conds), pick(self.step_index))

  def flat(self):
    """All samples with their own timestep: (x [S*N, ...], t [S*N], cond [S*N, ...] or None)."""
    s, n = self.xs.shape[:2]
    x = self.xs.reshape((s * n,) + self.xs.shape[2:])
    t = jnp.repeat(jnp.asarray(self.ts), n)
    c = None if self.conds is None else self.conds.reshape((s * n,) + self.conds.shape[2:])
    return x, t, c


def from_trajectory(xs, ts, conds=None) -> CalibData:
  """Wrap a sampler trajectory (xs [S, B, ...], ts [S]) as calibration data.

  `conds` is the conditioning the denoiser received at every step ([B, ...], e.g. labels incl. CFG null
  entries); it is repeated for each step.
  """
  xs = jnp.asarray(xs)
  if conds is not None:
    conds = jnp.asarray(conds)
    if conds.shape[0] != xs.shape[1]:
      raise ValueError(f"conds has batch {conds.shape[0]} but the trajectory has batch {xs.shape[1]}")
    conds = jnp.broadcast_to(conds[None], (xs.shape[0],) + conds.shape)
  return CalibData(xs, jnp.asarray(ts), conds, jnp.arange(xs.shape[0])).validate()


def select(data: CalibData, policy: str, num_steps: int, *, seed: int = 0, mu: float = 0.4,
           sigma: float = 0.4) -> CalibData:
  """Pick `num_steps` steps of a trajectory.

  Policies: 'all'; 'uniform' (evenly spaced, Q-Diffusion's timestep-aware calibration); 'random' (uniform
  random steps, PTQD/Q-DiT); 'normal' (PTQ4DM's NDTC: step positions drawn from N(mu, sigma^2) in units of
  the trajectory length measured from the *end* of denoising, so most samples come from late, low-noise
  steps; clipped and de-duplicated).
  """
  if policy not in SELECTIONS:
    raise ValueError(f"selection policy {policy!r} is unknown; accepted values: {', '.join(SELECTIONS)}")
  s = data.num_steps
  if not 1 <= num_steps <= s:
    raise ValueError(f"num_steps={num_steps} is out of range; accepted: 1..{s} (trajectory length)")
  rng = np.random.default_rng(seed)
  if policy == "all":
    idx = np.arange(s)
  elif policy == "uniform":
    idx = np.unique(np.round(np.linspace(0, s - 1, num_steps)).astype(int))
  elif policy == "random":
    idx = np.sort(rng.choice(s, size=num_steps, replace=False))
  else:
    draws = set()
    while len(draws) < num_steps:
      pos = int(np.clip(round(rng.normal(mu, sigma) * s), 0, s - 1))
      draws.add(s - 1 - pos)
    idx = np.array(sorted(draws))
  return data.select_steps(idx)
