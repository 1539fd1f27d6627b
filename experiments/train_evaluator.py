r"""Train the evaluator classifier on the MNIST-5k train split and ship it in dqjax/zoo/weights/evaluator.

  python -m experiments.train_evaluator
"""
from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dqjax.data import mnist
from dqjax.diffusion import training
from dqjax.metrics import evaluator
from dqjax.zoo import io

_STEPS = flags.DEFINE_integer("steps", 1500, "training steps")
_OUT = flags.DEFINE_string("out", evaluator.WEIGHTS, "output directory")
_SEED = flags.DEFINE_integer("seed", 0, "seed")


def _shift(x, key):
  """Random translations by up to 2 pixels (the only augmentation)."""
  dx, dy = jax.random.randint(key, (2,), -2, 3)
  return jnp.roll(jnp.roll(x, dx, axis=1), dy, axis=2)


def main(argv):
  del argv
  x, y = mnist.load_mnist("train")
  xh, yh = mnist.load_mnist("heldout")
  x, y = jnp.asarray(x), jnp.asarray(y)
  model = evaluator.DigitClassifier()
  params = model.init(jax.random.key(_SEED.value), x[:2])["params"]
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3, 100, _STEPS.value, 1e-4), weight_decay=1e-4))

  def loss_fn(p, batch, key):
    xb, yb = batch
    k1, k2 = jax.random.split(key)
    logits = model.apply({"params": p}, _shift(xb, k1), train=True, rngs={"dropout": k2})["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  idx = training.epoch_batches(x.shape[0], 64, _SEED.value)
  start = time.perf_counter()
  state = training.fit(training.init_state(params, opt), training.make_step(loss_fn, opt, 0.99),
                       lambda i: (x[idx(i)], y[idx(i)]), _STEPS.value, None, seed=_SEED.value, desc="evaluator")
  seconds = time.perf_counter() - start
  params = state.ema_params
  logits = model.apply({"params": params}, jnp.asarray(xh))["logits"]
  acc = float(np.mean(np.argmax(logits, -1) == yh))
  n = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))
  config = {"heldout_accuracy": acc, "steps": _STEPS.value, "num_params": n, "train_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
  io.save_params(_OUT.value, params, config)
  with open(os.path.join(_OUT.value, "README.md"), "w") as f:
    f.write(f"# evaluator\n\nDigit classifier used by every metric (see docs/metrics.md).\n\n"
            f"Reproduce: `python -m experiments.train_evaluator --steps={_STEPS.value} --seed={_SEED.value}`\n\n"
            f"| field | value |\n|---|---|\n| held-out accuracy (500 digits) | {acc:.4f} |\n"
            f"| parameters | {n:,} |\n| training | {_STEPS.value} steps, {seconds:.0f} s on {config['machine']} "
            f"({config['date']}) |\n")
  print(config)


if __name__ == "__main__":
  app.run(main)
