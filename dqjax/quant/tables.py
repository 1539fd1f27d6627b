"""Timestep-conditioned parameter tables.

An activation quantizer's parameters may depend on the diffusion timestep (TDQ, TFMQ-DM's FSC, APQ-DM's
groups, EfficientDM's TALSQ...). A table stores E entries (leading axis of every leaf) and an int32 index
over the model's training timesteps [T] that says which entry serves timestep t. Lookup is a gather inside
the compiled function, so one compiled sampler serves every step without retracing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TABLE_KINDS = ("static", "per_step", "groups")


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """How activation parameters are indexed by timestep.

  kind: 'static' (one entry for all t), 'per_step' (one entry per calibration timestep; a timestep between
    calibrated ones uses the nearest calibrated one), 'groups' (one entry per group of timesteps;
    `boundaries` are the first timestep of every group after the first, ascending, e.g. (250, 500, 750)).
  """
  kind: str = "static"
  boundaries: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in TABLE_KINDS:
      raise ValueError(f"TableSpec.kind={self.kind!r} is unknown; accepted values: {', '.join(TABLE_KINDS)}")
    if self.kind == "groups":
      b = list(self.boundaries)
      if not b or b != sorted(b) or len(set(b)) != len(b):
        raise ValueError(f"TableSpec.boundaries={self.boundaries!r} must be a non-empty strictly ascending "
                         "tuple of timesteps when kind='groups'")


def entry_of_steps(spec: TableSpec, step_timesteps: Sequence[int]) -> np.ndarray:
  """For calibration steps with model timesteps `step_timesteps`, the table entry each one feeds."""
  ts = np.asarray(step_timesteps, dtype=np.int64)
  if spec.kind == "static":
    return np.zeros(len(ts), np.int32)
  if spec.kind == "per_step":
    return np.arange(len(ts), dtype=np.int32)
  return np.searchsorted(np.asarray(spec.boundaries), ts, side="right").astype(np.int32)


def num_entries(spec: TableSpec, step_timesteps: Sequence[int]) -> int:
  if spec.kind == "static":
    return 1
  if spec.kind == "per_step":
    return len(step_timesteps)
  return len(spec.boundaries) + 1


def timestep_index(spec: TableSpec, step_timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
  """int32 [T]: the entry serving every training timestep (nearest calibrated step for 'per_step')."""
  all_t = np.arange(num_train_timesteps)
  if spec.kind == "static":
    return np.zeros(num_train_timesteps, np.int32)
  if spec.kind == "groups":
    return np.searchsorted(np.asarray(spec.boundaries), all_t, side="right").astype(np.int32)
  ts = np.asarray(step_timesteps, dtype=np.float64)
  return np.argmin(np.abs(all_t[:, None] - ts[None, :]), axis=1).astype(np.int32)


def lookup(table, index: Optional[jax.Array], t) -> object:
  """Select the entries of `table` (a pytree with leading entry axis) for timestep(s) t.

  t may be None (then entry 0), a scalar, or a [B] vector; with a vector the result gets a leading batch
  axis in place of the entry axis, which broadcasts against activations whose axis 0 is the batch.
  A static table (one entry) ignores t.
  """
  leaves = jax.tree_util.tree_leaves(table)
  if not leaves:
    return table
  n = leaves[0].shape[0]
  if index is None or t is None or n == 1:
    return jax.tree_util.tree_map(lambda a: a[0], table)
  t = jnp.asarray(t)
  ti = jnp.clip(jnp.round(t).astype(jnp.int32), 0, index.shape[0] - 1)
  e = index[ti]
  if e.ndim == 0:
    return jax.tree_util.tree_map(lambda a: a[e], table)
  # per-example entries: the entry axis becomes the batch axis (static params have a size-1 batch axis).
  return jax.tree_util.tree_map(lambda a: a[e].reshape((e.shape[0],) + a.shape[2:]) if a.ndim >= 2 else a[e],
                                table)
