"""Training: the ε/v-prediction loss, a jitted train step with EMA, and a resumable loop.

The loop is generic (`step_fn(state, batch, key) -> (state, metrics)`), so the zoo trains denoisers, the
autoencoder and the evaluator with it. Data order and noise are pure functions of (seed, step), so a run
that is killed and restarted from its last orbax checkpoint ends with bit-identical parameters.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from dqjax.diffusion.schedules import NoiseSchedule, q_sample, training_target


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  ema_params: Any
  step: jax.Array


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(params, optimizer.init(params), jax.tree_util.tree_map(jnp.copy, params),
                    jnp.zeros((), jnp.int32))


def diffusion_loss(params, apply_fn: Callable, schedule: NoiseSchedule, x0, key, cond=None, *,
                   cond_drop_prob: float = 0.0, null_cond=None):
  """Mean squared error of the ε (or v) prediction at uniformly drawn timesteps. With `cond_drop_prob`,
  conditioning is replaced by `null_cond` at that rate (classifier-free guidance training)."""
  k_t, k_n, k_d = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  if cond is not None and cond_drop_prob > 0:
    drop = jax.random.uniform(k_d, (b,)) < cond_drop_prob
    cond = jax.tree_util.tree_map(
        lambda c, u: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), jnp.broadcast_to(u, c.shape), c),
        cond, null_cond)
  out = apply_fn(params, x_t, t.astype(jnp.float32), cond)[..., :x0.shape[-1]]
  return jnp.mean((out - training_target(schedule, x0, t, noise)) ** 2)


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float = 0.999):
  """A jitted step from `loss_fn(params, batch, key) -> scalar`."""

  @jax.jit
  def step(state: TrainState, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
    return TrainState(params, opt_state, ema, state.step + 1), {"loss": loss}

  return step


def make_train_step(apply_fn: Callable, optimizer, schedule: NoiseSchedule, ema_decay: float = 0.999, *,
                    cond_drop_prob: float = 0.0, null_cond=None):
  """The diffusion train step; batches are (x0, cond) pairs (cond may be None)."""

  def loss(params, batch, key):
    x0, cond = batch
    return diffusion_loss(params, apply_fn, schedule, x0, key, cond, cond_drop_prob=cond_drop_prob,
                          null_cond=null_cond)

  return make_step(loss, optimizer, ema_decay)


def fit(state: TrainState, step_fn: Callable, batch_fn: Callable[[int], Any], num_steps: int,
        ckpt_dir: Optional[str] = None, *, seed: int = 0, save_every: int = 500, desc: str = "train") -> TrainState:
  """Run `step_fn` up to `num_steps`, resuming from the newest checkpoint in `ckpt_dir` if any.

  `batch_fn(step)` must be a pure function of the step (e.g. a seeded permutation), and the step's key
  is fold_in(key(seed), step), so resuming changes nothing.
  """
  manager = None
  if ckpt_dir:
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    latest = manager.latest_step()
    if latest is not None:
      state = manager.restore(latest, args=ocp.args.StandardRestore(state))
  start = int(state.step)
  key = jax.random.key(seed)
  bar = tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, mininterval=2.0)
  for i in bar:
    state, metrics = step_fn(state, batch_fn(i), jax.random.fold_in(key, i))
    if i % 100 == 0:
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if manager is not None and ((i + 1) % save_every == 0 or i + 1 == num_steps):
      import orbax.checkpoint as ocp
      manager.save(i + 1, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
  return state


def epoch_batches(n: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
  """Indices of the batch at any step: a fresh seeded permutation per epoch (pure function of step)."""
  per_epoch = n // batch_size

  def batch(step: int) -> np.ndarray:
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * batch_size:(j + 1) * batch_size]

  return batch
