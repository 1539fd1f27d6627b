"""Paired fidelity: FP and quantized samples from identical noise, compared image by image.

These are low-variance numbers that need few samples, which is why the benchmark reports them beside
FID: at high guidance FID can even improve when quantization adds diversity."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
  """Mean-squared-error PSNR over the whole set (dB); inf for identical sets."""
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, sigma: float = 1.5) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window σ=1.5, K1=0.01, K2=0.03) over images and channels."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  filt = lambda x: ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), truncate=3.5)
  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a ** 2
  var_b = filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return float(s.mean())


def trajectory_mse(traj_a, traj_b) -> np.ndarray:
  """Per-step MSE between two trajectories [S, B, ...] (e.g. FP and quantized x_t)."""
  a = np.asarray(traj_a, np.float64)
  b = np.asarray(traj_b, np.float64)
  return ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
