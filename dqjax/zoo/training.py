"""Training the zoo: the KL autoencoder and every denoiser, with dqjax's own loop (optax, EMA, resumable
orbax checkpoints, tqdm), on the MNIST-5k train split."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dqjax.data import mnist
from dqjax.diffusion import schedules, training
from dqjax.zoo import io
from dqjax.zoo.entry import build_model, build_text_encoder, load_autoencoder
from dqjax.zoo.registry import SPECS


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), max(steps, 2), lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))


def _subset(n: int, max_images: Optional[int]):
  """Index of the images a run uses: all, or `max_images` evenly spaced ones (the splits are sorted by
  label, so a prefix would hold a single digit)."""
  if max_images is None or max_images >= n:
    return slice(None)
  return np.round(np.linspace(0, n - 1, max_images)).astype(np.int64)


def _train_autoencoder(name, spec, steps, seed, ckpt_dir, max_images):
  tr = spec["train"]
  model = build_model(name)
  images, _ = mnist.load_mnist("train")
  images = jnp.asarray(images[_subset(len(images), max_images)])
  params = jax.jit(model.init)(jax.random.key(seed), images[:2])["params"]
  opt = _optimizer(tr["lr"], steps)

  def loss_fn(p, batch, key):
    mean, logvar = model.apply({"params": p}, batch, method=model.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = model.apply({"params": p}, z, method=model.decode)
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    return jnp.mean(jnp.abs(rec - batch)) + jnp.mean((rec - batch) ** 2) + tr["kl_weight"] * kl

  idx = training.epoch_batches(images.shape[0], tr["batch_size"], seed)
  state = training.fit(training.init_state(params, opt), training.make_step(loss_fn, opt, tr["ema"]),
                       lambda i: images[idx(i)], steps, ckpt_dir, seed=seed, desc=name)
  params = state.ema_params
  encode_mean = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])   # one compile
  means = [encode_mean(params, images[i:i + 500]) for i in range(0, images.shape[0], 500)]
  std = float(jnp.std(jnp.concatenate(means)))
  held, _ = mnist.load_mnist("heldout")
  held = held[_subset(len(held), max_images)]
  rec = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(held))
  mse = float(jnp.mean((rec - held) ** 2))
  psnr = float(10 * np.log10(4.0 / mse))
  return params, {"scaling_factor": 1.0 / std, "heldout_recon_psnr_db": round(psnr, 2)}


def _train_denoiser(name, spec, steps, seed, ckpt_dir, max_images):
  tr = spec["train"]
  model = build_model(name)
  sched = schedules.make_schedule(**spec["schedule"])
  images, labels = mnist.load_mnist("train")
  pick = _subset(len(images), max_images)
  images, labels = images[pick], labels[pick]
  key = jax.random.key(seed)
  if spec.get("latent"):
    ae = load_autoencoder()
    enc = jax.jit(lambda x: ae.model.apply({"params": ae.params}, x, method=ae.model.encode))
    parts = [enc(jnp.asarray(images[i:i + 500])) for i in range(0, len(images), 500)]
    means = jnp.concatenate([p[0] for p in parts]) * ae.scaling_factor
    stds = jnp.exp(0.5 * jnp.concatenate([p[1] for p in parts])) * ae.scaling_factor
  else:
    means, stds = jnp.asarray(images), None
  n = means.shape[0]
  m = spec["model"]
  x_example = jnp.zeros((2, m["sample_size"], m["sample_size"], m["in_channels"]))
  t_example = jnp.zeros((2,))
  cond_kind = spec["cond"]
  if cond_kind == "class":
    conds, null = jnp.asarray(labels, jnp.int32), jnp.int32(spec["num_classes"])
    denoiser_params = jax.jit(model.init)(key, x_example, t_example, jnp.zeros((2,), jnp.int32))["params"]
    params = denoiser_params
    apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  elif cond_kind == "text":
    te = build_text_encoder(name)
    conds = jnp.asarray(mnist.tokenize(mnist.captions("train"), te.max_len)[pick])
    null = jnp.zeros((te.max_len,), jnp.int32)
    k1, k2 = jax.random.split(key)
    te_params = jax.jit(te.init)(k1, conds[:2])["params"]
    states = jax.jit(te.apply)({"params": te_params}, conds[:2])
    params = {"denoiser": jax.jit(model.init)(k2, x_example, t_example, states)["params"], "text_encoder": te_params}
    apply_fn = lambda p, x, t, c: model.apply({"params": p["denoiser"]}, x, t,
                                              te.apply({"params": p["text_encoder"]}, c))
  else:
    conds, null = None, None
    params = jax.jit(model.init)(key, x_example, t_example)["params"]
    apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t)
  opt = _optimizer(tr["lr"], steps)
  step = training.make_train_step(apply_fn, opt, sched, tr["ema"], cond_drop_prob=tr.get("cond_drop", 0.0),
                                  null_cond=null)
  idx = training.epoch_batches(n, tr["batch_size"], seed)

  def batch(i):
    j = idx(i)
    x0 = means[j]
    if stds is not None:   # sample the posterior, a fresh draw per step (pure function of the step)
      x0 = x0 + stds[j] * jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), x0.shape)
    return x0, None if conds is None else conds[j]

  state = training.fit(training.init_state(params, opt), step, batch, steps, ckpt_dir, seed=seed, desc=name)
  return state.ema_params, {}


def train(name: str, *, steps: Optional[int] = None, seed: int = 0, ckpt_dir: Optional[str] = None,
          max_images: Optional[int] = None):
  """Train zoo model `name`; returns (params, config for its card).

  max_images: use only that many (evenly spaced) images of each split (train, and the autoencoder's
    heldout PSNR), for a quick smoke run; None (the default) uses them all. At least one batch is needed.
  """
  if name not in SPECS:
    raise ValueError(f"unknown zoo model {name!r}; accepted values: {', '.join(SPECS)}")
  spec = SPECS[name]
  if max_images is not None and max_images < spec["train"]["batch_size"]:
    raise ValueError(f"max_images={max_images} must be ≥ the batch size {spec['train']['batch_size']} of {name}")
  steps = steps or spec["train"]["steps"]
  fn = _train_autoencoder if spec["family"] == "autoencoder" else _train_denoiser
  params, extra = fn(name, spec, steps, seed, ckpt_dir, max_images)
  n_params = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))
  config = {"name": name, "spec": spec, "steps": steps, "seed": seed, "num_params": n_params,
            "size_mb_fp32": round(n_params * 4 / 1e6, 3), **extra}
  if max_images is not None:
    config["max_images"] = max_images
  return params, config


def save(out: str, params, config: dict) -> str:
  return io.save_params(out, params, config)


def evaluate_fp(name: str, n: int, seed: int = 0, params=None) -> dict:
  """The card's FP metrics: n samples from the zoo sampler, scored by the evaluator. `params` (as `train`
  returns them) scores those weights instead of the shipped ones, e.g. a run written to another --out."""
  from dqjax import metrics, zoo
  from dqjax.zoo import entry as entry_lib
  entry_lib._load_params.cache_clear()
  entry = zoo.load(name)
  if params is not None:
    entry = entry.with_params(params)
  imgs, labels = [], []
  for i in range(0, n, 250):
    x, y = jax.jit(lambda k: entry.generate(k, min(250, n - i)))(jax.random.key(seed + i))
    imgs.append(np.asarray(x))
    labels.append(y)
  images = np.concatenate(imgs)
  lab = None if labels[0] is None else np.concatenate(labels)
  scores = metrics.evaluate_samples(images, lab)
  return {k: round(float(v), 4) for k, v in scores.items()}


def write_card(out: str, name: str, config: dict) -> str:
  spec = SPECS[name]
  data = f"{config['max_images']} images of the" if config.get("max_images") else "the 4,500-image"
  lines = [f"# {name}", "", f"Trained by dqjax on MNIST-5k ({data} train split). {config.get('date', '')}", "",
           "Reproduce:", "", "```bash", config.get("command", f"python -m experiments.train_zoo --model={name}"),
           "```", "", "| field | value |", "|---|---|",
           f"| family | {spec['family']} |", f"| parameters | {config['num_params']:,} |",
           f"| size (fp32) | {config['size_mb_fp32']} MB |", f"| training steps | {config['steps']} |",
           f"| training time | {config.get('train_seconds', '?')} s on {config.get('machine', '?')} |"]
  for k in ("scaling_factor", "heldout_recon_psnr_db"):
    if k in config:
      lines.append(f"| {k} | {config[k]} |")
  if "sampler" in spec:
    lines.append(f"| sampler | {spec['sampler']} (guidance {spec.get('guidance_scale', 1.0)}) |")
    lines.append(f"| schedule | {spec['schedule']} |")
  if config.get("fp_metrics"):
    lines += ["", "FP metrics (evaluator features, see docs/metrics.md):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config["fp_metrics"].items()]
  lines += ["", "Architecture (diffusers config keys):", "", "```json", json.dumps(spec.get("model", {}), indent=1),
            "```"]
  path = os.path.join(out, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
