"""Loading a zoo model: weights from `dqjax/zoo/weights/<name>/`, plus everything needed to sample it."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.zoo.registry import AUTOENCODER, SPECS

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


def weights_dir(name: str) -> str:
  return os.path.join(WEIGHTS_DIR, name)


def build_model(name: str):
  """The Flax module of a zoo model from its spec (no weights)."""
  from dqjax import models
  spec = SPECS[name]
  kind = spec["kind"]
  if kind == "unet2d":
    return models.UNet2DModel(models.UNet2DConfig.from_dict(spec["model"]))
  if kind == "unet2d_condition":
    return models.UNet2DConditionModel(models.UNet2DConditionConfig.from_dict(spec["model"]))
  if kind == "dit":
    return models.DiTTransformer2DModel(models.DiTConfig.from_dict(spec["model"]))
  if kind == "autoencoder_kl":
    return models.AutoencoderKL(models.AutoencoderKLConfig.from_dict(spec["model"]))
  raise ValueError(f"zoo spec {name!r} has unknown kind {kind!r}")


def build_text_encoder(name: str):
  from dqjax.data import mnist
  from dqjax.zoo.text_encoder import TextEncoder
  te = SPECS[name]["text_encoder"]
  return TextEncoder(vocab_size=len(mnist.VOCAB), **te)


@functools.lru_cache(maxsize=None)
def _load_params(name: str):
  from dqjax.zoo import io
  path = weights_dir(name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"zoo model {name!r} has no weights at {path}; train it with "
                            f"`python -m experiments.train_zoo --model={name}`")
  return io.load_params(path)


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  model: Any
  params: Any
  scaling_factor: float

  def encode(self, images, key=None):
    mean, logvar = self.model.apply({"params": self.params}, images, method=self.model.encode)
    if key is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return mean * self.scaling_factor

  def decode(self, latents):
    return self.model.apply({"params": self.params}, latents / self.scaling_factor, method=self.model.decode)


@functools.lru_cache(maxsize=None)
def load_autoencoder() -> Autoencoder:
  params, config = _load_params(AUTOENCODER)
  return Autoencoder(build_model(AUTOENCODER), params, float(config.get("scaling_factor", 1.0)))


@dataclasses.dataclass(frozen=True, eq=False)
class ZooEntry:
  """A zoo denoiser with its schedule, sampler, conditioning and (for latent models) decoder."""
  name: str
  family: str
  model: Any
  params: Any
  schedule: Any
  sampler: Any
  sample_shape: tuple
  cond_kind: str                      # 'none' | 'class' | 'text'
  num_classes: Optional[int]
  guidance_scale: float
  num_train_timesteps: int
  card: dict
  autoencoder: Optional[Autoencoder] = None
  text: Optional[tuple] = None        # (text encoder module, its params) for cond_kind == 'text'

  def with_params(self, params) -> "ZooEntry":
    """The same model with other weights, in the layout `training.train` returns ({'denoiser', 'text_encoder'}
    for text models, the denoiser tree otherwise): scoring a freshly trained run that is not the shipped one."""
    if self.cond_kind == "text":
      if not isinstance(params, dict) or set(params) != {"denoiser", "text_encoder"}:
        raise ValueError(f"{self.name} params must be {{'denoiser', 'text_encoder'}}; got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
      return dataclasses.replace(self, params=params["denoiser"], text=(self.text[0], params["text_encoder"]))
    return dataclasses.replace(self, params=params)

  # --- conditioning -------------------------------------------------------------------------------
  def null_cond(self, n: int):
    if self.cond_kind == "class":
      return jnp.full((n,), self.num_classes, jnp.int32)
    if self.cond_kind == "text":
      from dqjax.data import mnist
      return self.encode_text(jnp.asarray(mnist.tokenize([""] * n, self.text[0].max_len)))
    return None

  def encode_text(self, tokens):
    enc, params = self.text
    return enc.apply({"params": params}, tokens)

  def cond_for_labels(self, labels, key=None):
    """Conditioning for digit labels: the label itself, or the states of a caption of that digit."""
    if self.cond_kind == "class":
      return jnp.asarray(labels, jnp.int32)
    if self.cond_kind == "text":
      from dqjax.data import mnist
      # Deterministic prompts (style word cycles with the position) so this also works under jit.
      labels = np.asarray(labels)
      caps = [f"a {mnist.STYLES[i % len(mnist.STYLES)]} {mnist.DIGITS[int(c)]}" for i, c in enumerate(labels)]
      return self.encode_text(jnp.asarray(mnist.tokenize(caps, self.text[0].max_len)))
    return None

  def eval_conditioning(self, key, n: int):
    """(cond for n samples, labels or None): balanced labels 0..9 for conditional models."""
    if self.cond_kind == "none":
      return None, None
    labels = np.arange(n) % 10
    return self.cond_for_labels(labels, key), labels

  def model_conditioning(self, cond):
    """What the network itself receives for `cond` (CFG evaluates cond and null in one batch)."""
    if cond is None:
      return None
    if self.guidance_scale == 1.0:
      return cond
    n = jax.tree_util.tree_leaves(cond)[0].shape[0]
    return jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], 0), cond, self.null_cond(n))

  # --- sampling -------------------------------------------------------------------------------------
  def fp_denoiser(self) -> Callable:
    return lambda x, t, cond=None: self.model.apply({"params": self.params}, x, t, cond)

  def guided(self, denoise: Callable) -> Callable:
    """`denoise` with classifier-free guidance applied (identity for unconditional models)."""
    if self.cond_kind == "none" or self.guidance_scale == 1.0:
      return denoise
    from dqjax.diffusion import guidance

    def cfg(x, t, cond):
      n = x.shape[0]
      return guidance.classifier_free_guidance(denoise, self.guidance_scale, self.null_cond(n))(x, t, cond)

    return cfg

  def decode(self, x0):
    return x0 if self.autoencoder is None else self.autoencoder.decode(x0)

  def generate(self, key, n: int, denoise: Optional[Callable] = None, correction=None):
    """n decoded samples (images in [-1, 1]) and their labels (None if unconditional)."""
    from dqjax.diffusion import samplers
    k1, k2, k3 = jax.random.split(key, 3)
    cond, labels = self.eval_conditioning(k1, n)
    x = jax.random.normal(k2, (n,) + tuple(self.sample_shape))
    res = samplers.sample(self.guided(denoise or self.fp_denoiser()), self.schedule, self.sampler, x, k3, cond,
                          correction=correction)
    return self.decode(res.x0), labels

  def example_args(self, batch: int):
    x = jnp.zeros((batch,) + tuple(self.sample_shape))
    t = jnp.full((batch,), 500.0)
    cond = None
    if self.cond_kind != "none":
      cond = self.cond_for_labels(np.arange(batch) % 10)
    return (x, t, cond)

  def env(self):
    from dqjax.methods.recipe import DiffusionEnv
    cond_sampler = None
    if self.cond_kind != "none":
      cond_sampler = lambda key, n: self.cond_for_labels(np.asarray(jax.random.randint(key, (n,), 0, 10)), key)
    null = None if self.cond_kind == "none" else self.null_cond(1)
    return DiffusionEnv(self.schedule, self.sampler, tuple(self.sample_shape), cond_sampler, null,
                        self.guidance_scale)


def load(name: str) -> ZooEntry:
  """Load a shipped zoo model, offline. Raises a clear error for an unknown name or missing weights."""
  from dqjax.diffusion import samplers, schedules
  if name not in SPECS or SPECS[name]["family"] == "autoencoder":
    raise ValueError(f"unknown zoo model {name!r}; accepted values: "
                     + ", ".join(n for n, s in SPECS.items() if s["family"] != "autoencoder"))
  spec = SPECS[name]
  params, config = _load_params(name)
  model = build_model(name)
  denoiser_params = params["denoiser"] if "denoiser" in params else params
  text = None
  if spec["cond"] == "text":
    text = (build_text_encoder(name), params["text_encoder"])
  sched = schedules.make_schedule(**spec["schedule"])
  sampler = samplers.SamplerConfig(**spec["sampler"])
  ae = load_autoencoder() if spec.get("latent") else None
  m = spec["model"]
  shape = (m["sample_size"], m["sample_size"], m["in_channels"])
  card = dict(config)
  return ZooEntry(name, spec["family"], model, denoiser_params, sched, sampler, shape, spec["cond"],
                  spec.get("num_classes"), float(spec.get("guidance_scale", 1.0)),
                  spec["schedule"]["num_train_timesteps"], card, ae, text)
