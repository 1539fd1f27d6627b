"""Training: the diffusion loss learns a toy problem; fit() resumes bit-identically from orbax checkpoints."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dqjax.diffusion import schedules, training


class ToyDenoiser(nn.Module):
  """An MLP over the flattened image with a sinusoidal timestep embedding and optional class labels."""
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, t, cond=None):
    b = x.shape[0]
    freqs = jnp.exp(-jnp.arange(8) * np.log(1000.0) / 8)
    temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    h = jnp.concatenate([x.reshape(b, -1), temb], -1)
    if cond is not None:
      h = h + nn.Embed(self.num_classes + 1, h.shape[-1])(cond)
    h = nn.silu(nn.Dense(64)(h))
    h = nn.silu(nn.Dense(64)(h))
    return nn.Dense(x[0].size)(h).reshape(x.shape)


def _data(n=64):
  """Two 2×2 patterns (the class decides which) — a data set whose ε is easy to learn."""
  labels = np.arange(n) % 2
  pats = np.array([[1, -1, -1, 1], [-1, 1, 1, -1]], np.float32)
  return jnp.asarray(pats[labels].reshape(n, 2, 2, 1)), jnp.asarray(labels, jnp.int32)


def _setup(prediction="epsilon", lr=3e-3):
  model = ToyDenoiser()
  x, y = _data()
  params = model.init(jax.random.key(0), x[:2], jnp.zeros((2,)), y[:2])["params"]
  apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  sched = schedules.make_schedule("linear", 100, 1e-3, 0.2, prediction)
  opt = optax.adam(lr)
  return model, x, y, params, apply_fn, sched, opt


def _eval_loss(params, apply_fn, sched, x, y):
  keys = jax.random.split(jax.random.key(123), 8)
  return float(np.mean([training.diffusion_loss(params, apply_fn, sched, x, k, y) for k in keys]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_few_steps_reduce_the_loss(prediction):
  _, x, y, params, apply_fn, sched, opt = _setup(prediction)
  step = training.make_train_step(apply_fn, opt, sched, ema_decay=0.9, cond_drop_prob=0.1, null_cond=2)
  batches = training.epoch_batches(x.shape[0], 32, seed=0)
  before = _eval_loss(params, apply_fn, sched, x, y)
  state = training.fit(training.init_state(params, opt), step, lambda i: (x[batches(i)], y[batches(i)]), 80,
                       progress=False)
  after = _eval_loss(state.params, apply_fn, sched, x, y)
  assert int(state.step) == 80
  assert after < 0.6 * before, (before, after)
  # the EMA trails the parameters but also learned
  assert _eval_loss(state.ema_params, apply_fn, sched, x, y) < 0.8 * before


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  _, x, y, params, apply_fn, sched, opt = _setup()
  step = training.make_train_step(apply_fn, opt, sched, ema_decay=0.9)
  batches = training.epoch_batches(x.shape[0], 16, seed=3)
  batch_fn = lambda i: (x[batches(i)], y[batches(i)])
  total = 7

  reference = training.fit(training.init_state(params, opt), step, batch_fn, total, str(tmp_path / "a"),
                           seed=5, save_every=3, progress=False)

  class Killed(RuntimeError):
    pass

  def dies_at_step_4(i):
    if i == 4:
      raise Killed()
    return batch_fn(i)

  with pytest.raises(Killed):
    training.fit(training.init_state(params, opt), step, dies_at_step_4, total, str(tmp_path / "b"), seed=5,
                 save_every=3, progress=False)
  assert training.latest_checkpoint_step(str(tmp_path / "b")) == 3

  calls = []

  def counting(i):
    calls.append(i)
    return batch_fn(i)

  resumed = training.fit(training.init_state(params, opt), step, counting, total, str(tmp_path / "b"), seed=5,
                         save_every=3, progress=False)
  assert calls == [3, 4, 5, 6]            # continued from the last saved step, not from scratch
  assert int(resumed.step) == total
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a different seed gives different parameters (the comparison above is not vacuous)
  other = training.fit(training.init_state(params, opt), step, batch_fn, total, None, seed=6, progress=False)
  assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(other.params)[0]),
                            np.asarray(jax.tree_util.tree_leaves(reference.params)[0]))
  # a finished run restarted does nothing more
  again = training.fit(training.init_state(params, opt), step, counting, total, str(tmp_path / "b"), seed=5,
                       progress=False)
  assert calls == [3, 4, 5, 6] and int(again.step) == total


def test_condition_dropout_uses_the_null_condition():
  _, x, y, params, apply_fn, sched, _ = _setup()
  key = jax.random.key(7)
  all_dropped = training.diffusion_loss(params, apply_fn, sched, x, key, y, cond_drop_prob=1.0, null_cond=2)
  with_null = training.diffusion_loss(params, apply_fn, sched, x, key, jnp.full_like(y, 2))
  with_labels = training.diffusion_loss(params, apply_fn, sched, x, key, y)
  np.testing.assert_allclose(float(all_dropped), float(with_null), rtol=1e-6)
  assert abs(float(with_labels) - float(with_null)) > 1e-6
  with pytest.raises(ValueError, match="null_cond"):
    training.diffusion_loss(params, apply_fn, sched, x, key, y, cond_drop_prob=0.5)


def test_loss_is_zero_for_the_exact_target():
  """The regression target is ε (or v) of the forward process the loss itself draws."""
  x, _ = _data(8)
  for prediction in ("epsilon", "v_prediction"):
    sched = schedules.make_schedule("linear", 50, 1e-3, 0.2, prediction)
    key = jax.random.key(0)
    k_t, k_n, _ = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (8,), 0, 50)
    noise = jax.random.normal(k_n, x.shape)
    target = schedules.training_target(sched, x, t, noise)
    oracle = lambda p, xt, tt, c: target
    assert float(training.diffusion_loss(None, oracle, sched, x, key)) == 0.0
    # and the v target converts back to the same ε and x₀
    x_t = schedules.q_sample(sched, x, t, noise)
    ab = sched.alphas_cumprod[t]
    eps, x0 = schedules.eps_and_x0(sched, target, x_t, ab)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(noise), atol=2e-5)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(x), atol=2e-4)


def test_epoch_batches_are_a_pure_function_of_seed_and_step():
  f = training.epoch_batches(10, 3, seed=1)
  epoch0 = np.concatenate([f(i) for i in range(3)])
  assert len(set(epoch0.tolist())) == 9                       # no repeats within an epoch
  np.testing.assert_array_equal(f(4), training.epoch_batches(10, 3, seed=1)(4))
  assert not np.array_equal(f(0), f(3))                       # a new permutation each epoch
  assert not np.array_equal(f(0), training.epoch_batches(10, 3, seed=2)(0))
  with pytest.raises(ValueError, match="batch_size"):
    training.epoch_batches(2, 3, seed=0)
