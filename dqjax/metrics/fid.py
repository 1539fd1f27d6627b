"""Sample-quality metrics with the ADM evaluator's definitions (FID, sFID, IS, precision/recall)."""
from __future__ import annotations

import numpy as np
from scipy import linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """|μ1−μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with the ADM fallback of adding eps·I when sqrtm fails."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  return float(max(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet_distance(*statistics(features_a), *statistics(features_b))


def inception_score(logits: np.ndarray, splits: int = 1) -> float:
  """exp(E_x KL(p(y|x) ‖ p(y))), averaged over `splits` equal splits (ADM uses 5,000-sample splits)."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _radii(f: np.ndarray, k: int) -> np.ndarray:
  d = _sq_dists(f, f)
  return np.partition(d, k, axis=1)[:, k]    # index 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Kynkäänniemi et al. 2019 with k-NN manifolds (k=3), squared Euclidean distances as in ADM."""
  r_real, r_fake = _radii(real, k), _radii(fake, k)
  d = _sq_dists(fake, real)                      # [fake, real]
  precision = float(np.mean(np.any(d <= r_real[None, :], axis=1)))
  recall = float(np.mean(np.any(d.T <= r_fake[None, :], axis=1)))
  return precision, recall
