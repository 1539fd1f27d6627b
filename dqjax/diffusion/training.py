"""Training: the ε/v-prediction loss, a jitted train step with EMA, and a generic resumable loop.

The loop is generic (`step_fn(state, batch, key) -> (state, metrics)`), so the zoo trains denoisers, the
autoencoder and the evaluator classifier with it. Data order (`batch_fn(step)`) and the step's key
(`fold_in(key(seed), step)`) are pure functions of (seed, step), so a run that is killed and restarted from
its last orbax checkpoint ends with bit-identical parameters to an uninterrupted run.
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
  """Everything a training run needs to continue: parameters, optimizer state, EMA parameters, step."""
  params: Any
  opt_state: Any
  ema_params: Any
  step: jax.Array   # int32 scalar: number of completed steps

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
    return cls(params, optimizer.init(params), jax.tree_util.tree_map(jnp.copy, params), jnp.zeros((), jnp.int32))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """`TrainState.create` as a function."""
  return TrainState.create(params, optimizer)


def _drop_cond(cond: Any, null_cond: Any, drop: jax.Array) -> Any:
  """Replace the conditioning of the examples where `drop` [B] is True by `null_cond` (broadcast)."""
  b = drop.shape[0]

  def one(c, u):
    c = jnp.asarray(c)
    u = jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape)
    return jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), u, c)

  return jax.tree_util.tree_map(one, cond, null_cond)


def diffusion_loss(params: Any, apply_fn: Callable, schedule: NoiseSchedule, x0: jax.Array, key: jax.Array,
                   cond: Any = None, *, cond_drop_prob: float = 0.0, null_cond: Any = None) -> jax.Array:
  """Mean squared error of the ε (or v, per `schedule.prediction_type`) prediction at timesteps drawn
  uniformly from 0..T−1 (Ho et al.'s simple loss).

  apply_fn(params, x_t, t, cond) -> output: t is float32 [B] holding integer timesteps (what the samplers
    feed); with learned sigma (2C outputs) only the first C channels enter the loss.
  cond_drop_prob: each example's conditioning is replaced by `null_cond` with this probability
    (classifier-free guidance training). `null_cond` broadcasts to the conditioning (a null class index,
    or one example's null tokens/states).
  """
  if not 0.0 <= cond_drop_prob <= 1.0:
    raise ValueError(f"cond_drop_prob={cond_drop_prob!r} must lie in [0, 1]")
  if cond_drop_prob > 0 and (cond is None or null_cond is None):
    raise ValueError("cond_drop_prob > 0 needs both `cond` and `null_cond`")
  k_t, k_n, k_d = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  if cond_drop_prob > 0:
    cond = _drop_cond(cond, null_cond, jax.random.uniform(k_d, (b,)) < cond_drop_prob)
  out = apply_fn(params, x_t, t.astype(jnp.float32), cond)
  if out.shape[:-1] != x0.shape[:-1] or out.shape[-1] < x0.shape[-1]:
    raise ValueError(f"apply_fn returned shape {out.shape} for inputs of shape {x0.shape}")
  target = training_target(schedule, x0, t, noise)
  return jnp.mean((out[..., :x0.shape[-1]] - target) ** 2)


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float = 0.999) -> Callable:
  """A jitted pure step `(state, batch, key) -> (state, {'loss', 'grad_norm'})` from any
  `loss_fn(params, batch, key) -> scalar`, with an EMA of the parameters (decay `ema_decay`)."""
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay={ema_decay!r} must lie in [0, 1)")

  @jax.jit
  def step(state: TrainState, batch: Any, key: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return TrainState(params, opt_state, ema, state.step + 1), metrics

  return step


def _split_batch(batch: Any):
  """A batch is x0, (x0, cond) or {'x': x0, 'cond': cond}."""
  if isinstance(batch, dict):
    return batch["x"], batch.get("cond")
  if isinstance(batch, (tuple, list)):
    if len(batch) != 2:
      raise ValueError(f"a tuple batch must be (x0, cond); got {len(batch)} items")
    return batch[0], batch[1]
  return batch, None


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation, schedule: NoiseSchedule,
                    ema_decay: float = 0.999, *, cond_drop_prob: float = 0.0, null_cond: Any = None) -> Callable:
  """The jitted diffusion train step `(state, batch, key) -> (state, metrics)`; batches are x0, (x0, cond)
  or {'x': x0, 'cond': cond}. See `diffusion_loss` for `apply_fn` and the conditioning dropout."""

  def loss(params, batch, key):
    x0, cond = _split_batch(batch)
    return diffusion_loss(params, apply_fn, schedule, x0, key, cond, cond_drop_prob=cond_drop_prob,
                          null_cond=null_cond)

  return make_step(loss, optimizer, ema_decay)


def _manager(ckpt_dir: str, max_to_keep: int):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def latest_checkpoint_step(ckpt_dir: str) -> Optional[int]:
  """The newest saved step in `ckpt_dir` (None if there is none)."""
  if not os.path.isdir(ckpt_dir):
    return None
  manager = _manager(ckpt_dir, 1)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def fit(state: Any, step_fn: Callable, batch_fn: Callable[[int], Any], num_steps: int,
        ckpt_dir: Optional[str] = None, *, seed: int = 0, save_every: int = 500, log_every: int = 100,
        max_to_keep: int = 2, desc: str = "train", log_fn: Optional[Callable[[int, dict], None]] = None,
        progress: bool = True) -> Any:
  """Run `step_fn` until `state.step == num_steps`, resuming from the newest checkpoint in `ckpt_dir`.

  state: any pytree with an integer `step` field (e.g. `TrainState`); step_fn(state, batch, key) ->
    (state, metrics) must advance `step` by one.
  batch_fn(step): the batch of that step, a pure function of (seed, step) (see `epoch_batches`).
  The key of step i is `jax.random.fold_in(jax.random.key(seed), i)`. An orbax checkpoint is written every
  `save_every` steps and at the end (`max_to_keep` kept); `log_every` steps, metrics go to the tqdm bar
  and to `log_fn(step, {name: float})`.
  """
  if num_steps < 0 or save_every < 1 or log_every < 1:
    raise ValueError(f"need num_steps ≥ 0, save_every ≥ 1, log_every ≥ 1; got {num_steps}, {save_every}, "
                     f"{log_every}")
  manager = None
  if ckpt_dir:
    import orbax.checkpoint as ocp
    manager = _manager(ckpt_dir, max_to_keep)
    latest = manager.latest_step()
    if latest is not None:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
      state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
  start = int(state.step)
  key = jax.random.key(seed)
  bar = tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, mininterval=2.0,
             disable=not progress)
  try:
    for i in bar:
      state, metrics = step_fn(state, batch_fn(i), jax.random.fold_in(key, i))
      if (i + 1) % log_every == 0 or i + 1 == num_steps:
        values = {k: float(v) for k, v in metrics.items()}
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        if log_fn is not None:
          log_fn(i + 1, values)
      if manager is not None and ((i + 1) % save_every == 0 or i + 1 == num_steps):
        import orbax.checkpoint as ocp
        manager.save(i + 1, args=ocp.args.StandardSave(state))
  finally:
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return state


def epoch_batches(n: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
  """`step -> indices` of that step's batch: a fresh seeded permutation of 0..n−1 per epoch (the last
  partial batch is dropped), a pure function of (seed, step)."""
  if batch_size < 1 or n < batch_size:
    raise ValueError(f"batch_size={batch_size} must be ≥ 1 and ≤ the dataset size n={n}")
  per_epoch = n // batch_size

  def batch(step: int) -> np.ndarray:
    epoch, j = divmod(int(step), per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * batch_size:(j + 1) * batch_size]

  return batch
