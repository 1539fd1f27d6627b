"""The survey's metrics on the offline evaluator, paired fidelity, and costs."""
from __future__ import annotations

from typing import Optional

import numpy as np

from dqjax.metrics.fid import fid, frechet_distance, inception_score, precision_recall, statistics  # noqa: F401
from dqjax.metrics.paired import psnr, ssim, trajectory_mse  # noqa: F401


def conditional_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples the evaluator classifies as the class (or caption digit) they were asked for —
  the analogue of the CLIP score's text-image agreement."""
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def evaluate_samples(images: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
  """FID, sFID, IS, precision, recall (and conditional accuracy) of generated images against MNIST-5k."""
  from dqjax.metrics import evaluator
  f = evaluator.load_evaluator()(images)
  ref = evaluator.reference()
  out = {"fid": frechet_distance(*statistics(f["pool"]), *ref["pool_stats"]),
         "sfid": frechet_distance(*statistics(f["spatial"]), *ref["spatial_stats"]),
         "is": inception_score(f["logits"])}
  out["precision"], out["recall"] = precision_recall(ref["pool_subset"], f["pool"])
  if labels is not None:
    out["cond_acc"] = conditional_accuracy(f["logits"], labels)
  return out
