"""The shipped zoo: every model loads offline and samples digits; every trainer runs (a few steps)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqjax import metrics, zoo
from dqjax.diffusion import training as loop
from dqjax.zoo import io, training


# The class-conditional check needs 40 samples; generating them in the load test of that model (not in a
# separate test with its own batch size) compiles its sampler once.
CONDITION_SAMPLES = {"ldm-mnist-cond": 40}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_loads_and_generates(name):
  """Every shipped model samples finite digits; the class-conditional one follows its condition (the
  CLIP-score analogue: its samples classify as the requested class)."""
  entry = zoo.load(name)
  assert entry.family == zoo.family_of(name)
  n = CONDITION_SAMPLES.get(name, 4)
  images, labels = jax.jit(lambda k: entry.generate(k, n))(jax.random.key(3))
  assert images.shape == (n, 32, 32, 1) and np.all(np.isfinite(images))
  assert (labels is None) == (entry.cond_kind == "none")
  card = open(os.path.join(os.path.dirname(zoo.__file__), "weights", name, "README.md")).read()
  assert "python -m experiments.train_zoo" in card
  if name in CONDITION_SAMPLES:
    from dqjax.metrics import evaluator
    acc = metrics.conditional_accuracy(evaluator.load_evaluator()(np.asarray(images))["logits"], labels)
    assert acc >= 0.8


def test_unknown_zoo_model_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown zoo model 'cifar'; accepted values: ddpm-mnist"):
    zoo.load("cifar")


@pytest.mark.parametrize("name", ["ae-mnist", "ddpm-mnist", "dit-mnist", "sd-mnist"])
def test_trainers_run_a_few_steps(name, tmp_path):
  """Each trainer's code path (autoencoder; pixel unconditional; latent + class; latent + text) on a
  64-image subset: the cost is compiling the real-size train step, not the data."""
  params, config = training.train(name, steps=2, ckpt_dir=str(tmp_path / "ckpt"), max_images=64)
  assert config["steps"] == 2 and config["num_params"] > 0 and config["max_images"] == 64
  assert loop.latest_checkpoint_step(str(tmp_path / "ckpt")) == 2
  out = training.save(str(tmp_path / "w"), params, config)
  loaded, cfg = io.load_params(out)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)


def test_train_subset_must_hold_a_batch():
  with pytest.raises(ValueError, match="max_images=8 must be ≥ the batch size 32 of ddpm-mnist"):
    training.train("ddpm-mnist", steps=1, max_images=8)


def test_corrupt_weights_are_a_clear_error(tmp_path):
  d = tmp_path / "w"
  io.save_params(str(d), {"a": {"kernel": jnp.ones((2, 2))}}, {"x": 1})
  (d / "params.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="is corrupt: params.safetensors cannot be read"):
    io.load_params(str(d))
  with pytest.raises(FileNotFoundError, match="no saved network"):
    io.load_params(str(tmp_path / "nothing"))


def test_with_params_swaps_the_weights_a_card_is_scored_with():
  """train_zoo scores the weights it just trained (not the shipped ones) when --out points elsewhere."""
  entry = zoo.load("sd-mnist")
  den = jax.tree_util.tree_map(jnp.zeros_like, entry.params)
  te = jax.tree_util.tree_map(jnp.ones_like, entry.text[1])
  swapped = entry.with_params({"denoiser": den, "text_encoder": te})
  assert swapped.params is den and swapped.text[1] is te and swapped.text[0] is entry.text[0]
  assert entry.params is not den                                   # the loaded entry is untouched
  with pytest.raises(ValueError, match="params must be {'denoiser', 'text_encoder'}"):
    entry.with_params(den)
  dit = zoo.load("dit-mnist")
  assert dit.with_params(den).params is den
