"""One call from generated images to the survey's sample-quality columns, on the offline evaluator."""
from __future__ import annotations

from typing import Optional

import numpy as np

from dqjax.metrics.fid import (conditional_accuracy, frechet_distance_to_reference, inception_score,
                               precision_recall)

IS_SPLIT_SIZE = 5000   # ADM's split size: a benchmark of ≤ 5,000 samples scores IS on one split


def evaluate_samples(images: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
  """{'fid', 'sfid', 'is', 'precision', 'recall'} (+ 'cond_acc' when `labels` are given) of generated
  images [N, 32, 32, 1] in [-1, 1] against the MNIST-5k train split, with ADM's definitions:

  fid / sfid   Fréchet distance of the evaluator's pooled / spatial features to the train statistics;
  is           Inception Score of the evaluator's logits (splits of 5,000);
  precision, recall   k=3 manifolds of pooled features, the 4,500 train digits as the reference set;
  cond_acc     fraction classified as their requested digit (the CLIP-score analogue).
  """
  from dqjax.metrics import evaluator
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[0] < 2:
    raise ValueError(f"images must be [N ≥ 2, 32, 32, 1]; got shape {images.shape}")
  if labels is not None and np.shape(labels) != (images.shape[0],):
    raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got shape {np.shape(labels)}")
  f = evaluator.load_evaluator()(images)
  ref = evaluator.reference()
  out = {"fid": frechet_distance_to_reference(f["pool"], ref["mu"], ref["sigma"]),
         "sfid": frechet_distance_to_reference(f["spatial"], ref["mu_s"], ref["sigma_s"]),
         "is": inception_score(f["logits"], split_size=IS_SPLIT_SIZE)}
  out["precision"], out["recall"] = precision_recall(ref["pool"], f["pool"])
  if labels is not None:
    out["cond_acc"] = conditional_accuracy(f["logits"], np.asarray(labels))
  return out
