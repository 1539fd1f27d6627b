r"""Sample every shipped zoo model, score it with the evaluator, write its card metrics, an image grid
under docs/zoo/ and the summary table docs/zoo.md.

  python -m experiments.zoo_report --samples=500
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

from dqjax import metrics, zoo
from dqjax.benchmark import report
from dqjax.zoo import io, training
from dqjax.zoo.entry import weights_dir

_SAMPLES = flags.DEFINE_integer("samples", 500, "samples per model")
_MODELS = flags.DEFINE_list("models", list(zoo.NAMES), "zoo models")
_DOCS = flags.DEFINE_string("docs", "docs", "docs directory")


def main(argv):
  del argv
  rows = []
  for name in _MODELS.value:
    if not name or not os.path.isdir(weights_dir(name)):
      print(f"skip {name}: no weights")
      continue
    entry = zoo.load(name)
    gen = jax.jit(lambda k, n=min(250, _SAMPLES.value): entry.generate(k, n))
    imgs, labels = [], []
    for i in range(0, _SAMPLES.value, 250):
      x, y = gen(jax.random.key(100 + i))
      imgs.append(np.asarray(x))
      labels.append(y)
    images = np.concatenate(imgs)[:_SAMPLES.value]
    lab = None if labels[0] is None else np.concatenate(labels)[:_SAMPLES.value]
    scores = {k: round(float(v), 4) for k, v in metrics.evaluate_samples(images, lab).items()}
    params, config = io.load_params(weights_dir(name))
    config["fp_metrics"] = {**scores, "num_samples": int(images.shape[0])}
    io.save_params(weights_dir(name), params, config)
    training.write_card(weights_dir(name), name, config)
    grid = report.save_grid(images[:64], os.path.join(_DOCS.value, "zoo", f"{name}.png"))
    rows.append((name, entry.family, config, scores, grid))
  done = {r[0] for r in rows}
  for name in zoo.NAMES:      # models not re-sampled now keep the metrics already on their cards
    if name not in done and os.path.isdir(weights_dir(name)):
      _, config = io.load_params(weights_dir(name))
      if config.get("fp_metrics"):
        rows.append((name, zoo.family_of(name), config, config["fp_metrics"], None))
  rows.sort(key=lambda r: zoo.NAMES.index(r[0]))
  real, _ = __import__("dqjax.data.mnist", fromlist=["x"]).load_mnist("heldout")
  noise = np.clip(np.random.default_rng(0).standard_normal(real.shape), -1, 1).astype(np.float32)
  base = {"held-out real digits": metrics.evaluate_samples(real), "uniform noise": metrics.evaluate_samples(noise)}
  lines = ["# The offline model zoo", "",
           "Every model is trained by dqjax on MNIST-5k (see each card in `dqjax/zoo/weights/<name>/README.md` for "
           "its command, size and training time). Metrics use the evaluator classifier's features "
           "(docs/metrics.md), "
           f"{_SAMPLES.value} samples per model, from the shipped sampler.", "",
           "| model | family | params | size (MB) | FID ↓ | sFID ↓ | IS ↑ | precision | recall | cond. acc |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, fam, config, s, _ in rows:
    lines.append(f"| {name} | {fam} | {config['num_params']:,} | {config['size_mb_fp32']} | {s['fid']:.2f} | "
                 f"{s['sfid']:.2f} | {s['is']:.2f} | {s['precision']:.3f} | {s['recall']:.3f} | "
                 + (f"{s['cond_acc']:.3f} |" if "cond_acc" in s else "– |"))
  for label, s in base.items():
    lines.append(f"| *{label}* | reference | – | – | {s['fid']:.2f} | {s['sfid']:.2f} | {s['is']:.2f} | "
                 f"{s['precision']:.3f} | {s['recall']:.3f} | – |")
  lines += [""] + [f"## {name}\n\n![{name}](zoo/{name}.png)\n" for name, *_ in rows
                   if os.path.exists(os.path.join(_DOCS.value, "zoo", f"{name}.png"))]
  with open(os.path.join(_DOCS.value, "zoo.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines[:len(rows) + 10]))


if __name__ == "__main__":
  app.run(main)
