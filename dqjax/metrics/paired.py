"""Paired fidelity: FP and quantized samples drawn from identical noise, compared image by image.

These numbers have low variance and need few samples, which is why the benchmark reports them beside FID:
at high guidance FID can even improve when quantization adds diversity (see docs/metrics.md).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5            # 11×11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"{what}: the two arrays must have the same shape; got {a.shape} and {b.shape}")
  if a.size == 0:
    raise ValueError(f"{what}: empty input")
  return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
  """10·log10(range² / MSE) in dB, with the MSE over the whole set (so one exactly reproduced image does
  not make the mean infinite); inf for identical sets. data_range=2 for images in [-1, 1]."""
  a, b = _pair(a, b, "psnr")
  mse = float(np.mean((a - b) ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
  """The SSIM map of Wang et al. 2004 for NHWC images: Gaussian 11×11 window (σ=1.5), K1=0.01, K2=0.03,
  'valid' windows only (the 5-pixel border is dropped, as the reference MATLAB `ssim_index`), each
  channel separately. Returns [N, H−10, W−10, C]."""
  a, b = _pair(a, b, "ssim")
  if a.ndim != 4:
    raise ValueError(f"ssim: images must be NHWC; got shape {a.shape}")
  if min(a.shape[1:3]) < 2 * SSIM_RADIUS + 1:
    raise ValueError(f"ssim: images must be at least {2 * SSIM_RADIUS + 1}×{2 * SSIM_RADIUS + 1}; got {a.shape[1:3]}")
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  r = SSIM_RADIUS

  def filt(x):  # normalised Gaussian, truncated at radius 5; the border is cropped, so the mode is moot
    y = ndimage.gaussian_filter(x, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=r / SSIM_SIGMA, mode="constant")
    return y[:, r:-r, r:-r, :]

  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a ** 2
  var_b = filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
  """Mean SSIM over images, channels and positions (see `ssim_map`); 1 for identical sets."""
  return float(ssim_map(a, b, data_range).mean())


def trajectory_mse(traj_a, traj_b) -> np.ndarray:
  """Per-step MSE [S] between two trajectories [S, B, ...] (e.g. the FP and quantized x_t from the same
  noise): where along sampling the quantization error appears and how it accumulates."""
  a, b = _pair(traj_a, traj_b, "trajectory_mse")
  if a.ndim < 2:
    raise ValueError(f"trajectory_mse: trajectories must be [S, B, ...]; got shape {a.shape}")
  return ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
