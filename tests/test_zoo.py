"""The shipped zoo: every model loads offline and samples digits; every trainer runs (a few steps)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax import metrics, zoo
from dqjax.zoo import io, training


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_loads_and_generates(name):
  entry = zoo.load(name)
  assert entry.family == zoo.family_of(name)
  images, labels = jax.jit(lambda k: entry.generate(k, 4))(jax.random.key(0))
  assert images.shape == (4, 32, 32, 1) and np.all(np.isfinite(images))
  assert (labels is None) == (entry.cond_kind == "none")
  card = open(os.path.join(os.path.dirname(zoo.__file__), "weights", name, "README.md")).read()
  assert "python -m experiments.train_zoo" in card


def test_unknown_zoo_model_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown zoo model 'cifar'; accepted values: ddpm-mnist"):
    zoo.load("cifar")


def test_conditional_models_follow_their_condition():
  """Class-conditional zoo samples classify as the requested class (the CLIP-score analogue)."""
  entry = zoo.load("ldm-mnist-cond")
  images, labels = jax.jit(lambda k: entry.generate(k, 40))(jax.random.key(3))
  from dqjax.metrics import evaluator
  acc = metrics.conditional_accuracy(evaluator.load_evaluator()(np.asarray(images))["logits"], labels)
  assert acc >= 0.8


@pytest.mark.parametrize("name", ["ae-mnist", "ddpm-mnist", "dit-mnist", "sd-mnist"])
def test_trainers_run_a_few_steps(name, tmp_path):
  params, config = training.train(name, steps=2, ckpt_dir=str(tmp_path / "ckpt"))
  assert config["steps"] == 2 and config["num_params"] > 0
  out = training.save(str(tmp_path / "w"), params, config)
  loaded, cfg = io.load_params(out)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)


def test_corrupt_weights_are_a_clear_error(tmp_path):
  d = tmp_path / "w"
  io.save_params(str(d), {"a": {"kernel": jnp.ones((2, 2))}}, {"x": 1})
  (d / "params.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="is corrupt: params.safetensors cannot be read"):
    io.load_params(str(d))
  with pytest.raises(FileNotFoundError, match="no saved network"):
    io.load_params(str(tmp_path / "nothing"))
