r"""Train a zoo model on MNIST-5k (train split) and write its weights and card into dqjax/zoo/weights/<name>.

  python -m experiments.train_zoo --model=ae-mnist          # first: the latent models need it
  python -m experiments.train_zoo --model=ldm-mnist
  python -m experiments.train_zoo --model=ldm-mnist --steps=50 --max_images=256 --out=/tmp/w   # a smoke run

Training is resumable: checkpoints go to --ckpt_dir (default runs/train/<name>) and a restarted run
continues from the last one; the same seed gives the same weights.
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

from dqjax.zoo import registry

_MODEL = flags.DEFINE_enum("model", "ldm-mnist", list(registry.SPECS), "zoo model to train")
_STEPS = flags.DEFINE_integer("steps", None, "training steps (default: the spec's)")
_OUT = flags.DEFINE_string("out", None, "output directory (default: dqjax/zoo/weights/<model>)")
_CKPT = flags.DEFINE_string("ckpt_dir", None, "resumable checkpoints (default: runs/train/<model>)")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "use only this many images per split (smoke runs; "
                                   "default: all)")
_EVAL = flags.DEFINE_integer("eval_samples", 500, "samples for the card's FP metrics (0: skip)")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "only recompute the card's FP metrics of saved weights")


def main(argv):
  del argv
  from dqjax.zoo import training
  name = _MODEL.value
  out = _OUT.value or os.path.join(os.path.dirname(registry.__file__), "weights", name)
  ckpt = _CKPT.value or os.path.join("runs", "train", name)
  if _EVAL_ONLY.value:
    from dqjax.zoo import io
    params, config = io.load_params(out)
    config["fp_metrics"] = training.evaluate_fp(name, _EVAL.value, seed=_SEED.value, params=params)
    training.save(out, params, config)
    training.write_card(out, name, config)
    print(json.dumps(config["fp_metrics"], indent=1))
    return
  start = time.perf_counter()
  params, config = training.train(name, steps=_STEPS.value, seed=_SEED.value, ckpt_dir=ckpt,
                                  max_images=_MAX_IMAGES.value)
  train_seconds = time.perf_counter() - start
  config.update(train_seconds=round(train_seconds, 1), machine=f"{platform.machine()} {os.cpu_count()} cores",
                date=time.strftime("%Y-%m-%d"),
                command=f"python -m experiments.train_zoo --model={name}"
                        + (f" --steps={_STEPS.value}" if _STEPS.value else "") + f" --seed={_SEED.value}"
                        + (f" --max_images={_MAX_IMAGES.value}" if _MAX_IMAGES.value else ""))
  training.save(out, params, config)
  if _EVAL.value and registry.SPECS[name]["family"] != "autoencoder":
    metrics = training.evaluate_fp(name, _EVAL.value, seed=_SEED.value, params=params)
    config["fp_metrics"] = metrics
    training.save(out, params, config)
  training.write_card(out, name, config)
  print(json.dumps({k: v for k, v in config.items() if k != "model"}, indent=1))


if __name__ == "__main__":
  app.run(main)
