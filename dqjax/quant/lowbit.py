"""Pure building blocks of the QAT / ultra-low-bit methods that the core quantizer does not express.

- `approx_sign`: sign forward, Bi-Real's piecewise-quadratic backward (BiDM's activation binarizer).
- `lmb_weight` / `lmb_init`: BinaryDM's learnable multi-basis binarizer α1·sign(W) + α2·sign(W − α1·sign(W)).
- `xnor_scale_map`: XNOR-Net's spatial activation magnitude K = avgpool_k(mean_c |x|) for binary convolutions.
- `intlora_*`: IntLoRA's adaptation-quantization separation (auxiliary matrix R with variance matching) and the
  multiplicative merge W' = q(s + (R + BA) ⊘ (W_int − z)) ⊙ (W_int − z), whose result is an integer product.
- `tuneqdm_weight`: TuneQDM's separable, timestep-selected scales (W_int − z) ⊙ δ_out ⊙ δ_in.

Everything is a pure function of arrays (jit/grad-safe). Kernels follow Flax's layout: the output channel is
the last axis, the input channel the one before it ([in, out] for Dense, [kh, kw, in, out] for Conv).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.quant import ops as qops
from dqjax.quant.spec import QuantSpec

Array = jax.Array


def kernel_axes(kernel: Array) -> tuple[int, ...]:
  """Axes a per-output-channel parameter reduces over (all but the last)."""
  return tuple(range(kernel.ndim - 1))


# --- binarizers -----------------------------------------------------------------------------------
def approx_sign(x: Array) -> Array:
  """sign(x) forward (+1 at 0, so the output is strictly binary); ApproxSign backward (Bi-Real / BiDM):
  d/dx = 2 + 2x on [−1, 0), 2 − 2x on [0, 1), 0 outside."""
  s = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
  poly = jnp.where(x < -1, -1.0, jnp.where(x < 0, x * x + 2 * x, jnp.where(x < 1, -x * x + 2 * x, 1.0)))
  poly = poly.astype(x.dtype)
  return poly + jax.lax.stop_gradient(s - poly)


def lmb_init(w: Array, order: int) -> tuple[Array, Optional[Array]]:
  """Initial per-output-channel bases: α1 = mean|W|, α2 = mean|W − α1·sign(W)| (BinaryDM's first forward)."""
  if order not in (1, 2):
    raise ValueError(f"LMB order={order!r} is not supported; accepted values: 1, 2")
  axes = kernel_axes(w)
  a1 = jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
  if order == 1:
    return a1, None
  s1 = jnp.where(w >= 0, 1.0, -1.0)
  a2 = jnp.mean(jnp.abs(w - a1 * s1), axis=axes, keepdims=True)
  return a1, a2


def lmb_weight(w: Array, alpha1: Array, alpha2: Optional[Array] = None) -> Array:
  """Learnable multi-basis binarization. sign has BinaryDM's STE (identity inside |x| ≤ 1, zero outside);
  α1 and α2 receive ordinary gradients."""
  b = alpha1 * qops.sign_ste(w)
  if alpha2 is None:
    return b
  return b + alpha2 * qops.sign_ste(w - b)


def xnor_weight(w: Array) -> Array:
  """sign(W)·mean|W| per output channel, the scale detached (recomputed from W at every call); STE through
  clip(W, −1, 1) (BiDM's BNN layers)."""
  scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=kernel_axes(w), keepdims=True))
  return scale * qops.sign_ste(w)


def _pairs(padding, n: int):
  """Flax/lax padding spec → explicit (lo, hi) pairs, or the string 'SAME'/'VALID'."""
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return tuple((padding, padding) for _ in range(n))
  out = []
  for p in padding:
    out.append((p, p) if isinstance(p, int) else tuple(p))
  return tuple(out)


def xnor_scale_map(x: Array, kernel_size: Sequence[int], strides: Optional[Sequence[int]] = None,
                   padding="SAME") -> Array:
  """K = avgpool_k(mean over channels of |x|), with the convolution's own window, stride and padding
  ([B, H', W', 1]; BiDM's `fliter_k`, a fixed 1/k² filter)."""
  k = tuple(int(v) for v in kernel_size)
  n = len(k)
  s = tuple(int(v) for v in (strides or (1,) * n))
  a = jnp.mean(jnp.abs(x), axis=-1, keepdims=True)
  filt = jnp.full(k + (1, 1), 1.0 / float(np.prod(k)), x.dtype)
  spatial = "".join("HWD"[i] for i in range(n))
  dn = jax.lax.conv_dimension_numbers(a.shape, filt.shape, ("N" + spatial + "C", spatial + "IO",
                                                              "N" + spatial + "C"))
  return jax.lax.conv_general_dilated(a, filt, s, _pairs(padding, n), dimension_numbers=dn)


# --- IntLoRA ----------------------------------------------------------------------------------------
def intlora_aux(key: Array, w: Array, *, alpha: float = 1.5, laplace_scale: float = 0.5) -> Array:
  """The auxiliary matrix R ~ Laplace(0, b) with variance-matching control: every output channel of R is
  rescaled by absmax(W_c)^α / min(|max R_c|, |min R_c|)^α (IntLoRA's VMC)."""
  r = jax.random.laplace(key, w.shape, jnp.float32) * laplace_scale
  axes = kernel_axes(w)
  r_ext = jnp.minimum(jnp.abs(jnp.max(r, axes, keepdims=True)), jnp.abs(jnp.min(r, axes, keepdims=True)))
  w_ext = jnp.maximum(jnp.abs(jnp.max(w, axes, keepdims=True)), jnp.abs(jnp.min(w, axes, keepdims=True)))
  return (w_ext ** alpha / (r_ext + 1e-8) ** alpha) * r


def intlora_scale(codes: Array, s: Array, r: Array, delta: Array) -> Array:
  """s' = s + (R + ΔW) ⊘ (W_int − z), with 1 in the denominator where the centred code is 0 (IntLoRA)."""
  den = jnp.where(codes == 0, 1.0, codes)
  return s + (r + delta) / den


def intlora_merge(codes: Array, s_prime: Array, spec: QuantSpec, qp: Optional[qops.QParams],
                  variant: str = "mul") -> Array:
  """The merged weight. 'mul': q(s') ⊙ (W_int − z) with s' quantized per output channel (integer × integer,
  times a per-channel step); 'shift': sign(s')·2^round(log2|s'|) ⊙ (W_int − z) (a bit shift); 'none': s' ⊙
  (W_int − z) (no double quantization)."""
  if variant == "mul":
    return qops.fake_quant(s_prime, qp, spec) * codes
  if variant == "shift":
    mag = jnp.exp2(qops.round_ste(jnp.log2(jnp.maximum(jnp.abs(s_prime), 1e-12))))
    return jnp.where(s_prime >= 0, 1.0, -1.0) * mag * codes
  if variant == "none":
    return s_prime * codes
  raise ValueError(f"IntLoRA variant={variant!r} is unknown; accepted values: mul, shift, none")


# --- TuneQDM ------------------------------------------------------------------------------------------
def tuneqdm_weight(codes: Array, d_out: Array, d_in: Array) -> Array:
  """(W_int − z) ⊙ δ_out ⊙ δ_in: δ_out broadcasts over the output axis, δ_in over the input axis."""
  return codes * d_out * d_in


def centred_codes(w: Array, qp: qops.QParams, spec: QuantSpec) -> Array:
  """W_int − z as float (the frozen integer part that TuneQDM and IntLoRA rescale)."""
  codes = qops.quantize(w, qp, spec).astype(jnp.float32)
  if spec.symmetric or qp.zero_point is None:
    return codes
  return codes - jnp.round(qp.zero_point)
