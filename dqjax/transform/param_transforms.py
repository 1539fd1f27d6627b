"""Equivalent parameter-tree transforms: they change how an op is computed, not what it computes.

Each transform takes a `QModel` and returns a new one whose float function is unchanged (tested to 1e-4)
but whose tensors are easier to quantize: SmoothQuant-style channel balancing (activation outliers moved
into the weights), rotations (Hadamard: outliers spread over channels), a low-rank float branch that
absorbs the largest singular directions of a weight (SVDQuant), LoRA adapters (zero-initialised, merged
before weight quantization), and input splits (Q-Diffusion's separately quantized concat halves).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dqjax.transform import apply as qapply
from dqjax.transform.state import update_op


def _kernel_kind(qm, path: str) -> str:
  op = qm.plan[path]
  if op.info.kind not in ("dense", "conv") or op.info.weight_shape is None:
    raise ValueError(f"op {path!r} is a {op.info.kind}; this transform accepts Dense or Conv ops")
  if op.info.kind == "dense" and len(op.info.weight_shape) != 2:
    raise ValueError(f"op {path!r} has kernel shape {op.info.weight_shape}; accepted: 2-D Dense kernels")
  return op.info.kind


def _set(params, key: str, value):
  flat = traverse_util.flatten_dict(params, sep="/")
  if key not in flat:
    raise KeyError(f"params have no entry {key!r}")
  flat[key] = value
  return traverse_util.unflatten_dict(flat, sep="/")


def _get(params, key: str):
  return traverse_util.flatten_dict(params, sep="/")[key]


def smooth(qm, path: str, factors: jax.Array):
  """Divide the op's input by `factors` (per input channel) at run time and multiply the kernel's input
  rows by them: x W = (x / s)(s W). Composes with an existing smoothing (factors multiply)."""
  _kernel_kind(qm, path)
  k = qapply.get_kernel(qm.params, path)
  s = jnp.asarray(factors, k.dtype)
  if s.shape != (k.shape[-2],):
    raise ValueError(f"smoothing factors for {path!r} have shape {s.shape}; expected ({k.shape[-2]},), the "
                     "op's input channels")
  params = _set(qm.params, f"{path}/kernel", k * s[:, None])
  st = qm.qstate.get(path)
  prev = None if st is None else st.smooth
  return qm.replace(params=params, qstate=update_op(qm.qstate, path, smooth=s if prev is None else prev * s))


def fold_smoothing(qm, path: str, prev_path: str):
  """Fold op `path`'s run-time divisor into the output channels of the op `prev_path` that feeds it
  (offline re-parameterization). Valid only when the ops are joined by channel-wise-linear-free
  paths (nothing but identity); the caller asserts that."""
  st = qm.qstate.get(path)
  if st is None or st.smooth is None:
    raise ValueError(f"op {path!r} has no smoothing to fold")
  s = st.smooth
  k = qapply.get_kernel(qm.params, prev_path)
  if k.shape[-1] != s.shape[0]:
    raise ValueError(f"cannot fold {path!r} smoothing ({s.shape[0]} channels) into {prev_path!r} with "
                     f"{k.shape[-1]} output channels")
  params = _set(qm.params, f"{prev_path}/kernel", k / s)
  flat = traverse_util.flatten_dict(params, sep="/")
  if f"{prev_path}/bias" in flat:
    params = _set(params, f"{prev_path}/bias", flat[f"{prev_path}/bias"] / s)
  return qm.replace(params=params, qstate=update_op(qm.qstate, path, smooth=None))


def hadamard(n: int) -> np.ndarray:
  """Orthonormal Hadamard matrix of size n (Sylvester construction; n must be a power of two)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard(n={n}): n must be a power of two; use random_orthogonal for other sizes")
  h = np.array([[1.0]])
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / math.sqrt(n)).astype(np.float32)


def random_orthogonal(n: int, key: jax.Array) -> jax.Array:
  """A random orthogonal matrix (QR of a Gaussian, sign-fixed) for rotations of any size."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  return (q * jnp.sign(jnp.diagonal(r))[None, :]).astype(jnp.float32)


def rotate(qm, path: str, rotation: jax.Array):
  """Rotate the op's input channels: x W = (x R)(Rᵀ W) for orthogonal R."""
  _kernel_kind(qm, path)
  k = qapply.get_kernel(qm.params, path)
  r = jnp.asarray(rotation, k.dtype)
  if r.shape != (k.shape[-2], k.shape[-2]):
    raise ValueError(f"rotation for {path!r} has shape {r.shape}; expected {(k.shape[-2],) * 2}")
  st = qm.qstate.get(path)
  if st is not None and st.lowrank is not None:
    raise ValueError(f"op {path!r}: rotate before adding a low-rank branch, not after")
  new_k = jnp.einsum("ji,...jo->...io", r, k)
  prev = None if st is None else st.rotate
  return qm.replace(params=_set(qm.params, f"{path}/kernel", new_k),
                    qstate=update_op(qm.qstate, path, rotate=r if prev is None else prev @ r))


def add_lowrank_branch(qm, path: str, rank: int):
  """Split W into a rank-r float branch A@B (top singular directions, computed in float64 on the host)
  and the residual W − A@B that gets quantized (SVDQuant). Dense and 1×1 Conv ops."""
  kind = _kernel_kind(qm, path)
  k = qapply.get_kernel(qm.params, path)
  if kind == "conv" and k.shape[:-2] != (1,) * (k.ndim - 2):
    raise ValueError(f"op {path!r}: a low-rank branch needs a 1×1 convolution; kernel is {k.shape}")
  w = np.asarray(k, np.float64).reshape(k.shape[-2], k.shape[-1])
  if not 1 <= rank <= min(w.shape):
    raise ValueError(f"rank={rank} is out of range for {path!r}; accepted: 1..{min(w.shape)}")
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  a = u[:, :rank] * np.sqrt(s[:rank])
  b = np.sqrt(s[:rank])[:, None] * vt[:rank]
  residual = (w - a @ b).reshape(k.shape).astype(np.float32)
  return qm.replace(params=_set(qm.params, f"{path}/kernel", jnp.asarray(residual)),
                    qstate=update_op(qm.qstate, path, lowrank=(jnp.asarray(a, jnp.float32),
                                                             jnp.asarray(b, jnp.float32))))


def add_lora(qm, path: str, rank: int, key: jax.Array, *, init_scale: Optional[float] = None):
  """A LoRA adapter (A random, B zero, so the function is unchanged) merged into the kernel before weight
  quantization. The kernel is viewed as [prod(kernel.shape[:-1]), out]."""
  k = qapply.get_kernel(qm.params, path)
  fan_in = int(np.prod(k.shape[:-1]))
  scale = init_scale if init_scale is not None else 1.0 / math.sqrt(fan_in)
  a = jax.random.normal(key, (fan_in, rank), jnp.float32) * scale
  b = jnp.zeros((rank, k.shape[-1]), jnp.float32)
  return qm.replace(qstate=update_op(qm.qstate, path, lora=(a, b)))


def merge_lora(qm):
  """Fold every LoRA adapter into its float kernel (then it is quantized like any weight)."""
  params, qstate = qm.params, dict(qm.qstate)
  for path, st in qm.qstate.items():
    if st.lora is None:
      continue
    params = _set(params, f"{path}/kernel", qapply.effective_kernel(qapply.get_kernel(params, path), st))
    qstate[path] = st.replace(lora=None)
  return qm.replace(params=params, qstate=qstate)


def split_input(qm, path: str, channels: int):
  """Quantize the first `channels` input channels and the rest separately (activations and weights), as
  Q-Diffusion does for convolutions over concatenated skip connections."""
  op = qm.plan[path]
  c_in = op.info.input_shapes[0][-1]
  if not 0 < channels < c_in:
    raise ValueError(f"split_input({path!r}, channels={channels}): accepted 1..{c_in - 1} (input channels)")
  return qm.replace(plan=qm.plan.replace_op(path, input_split=int(channels)))
