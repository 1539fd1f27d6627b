"""The FID Inception-v3 (TF "2015-12-05" graph layout) in Flax, for FID/sFID/IS/P-R on real benchmarks.

Layout: the torchvision Inception-v3 trunk with the FID patches of pytorch-fid / torch-fidelity — average
pools in the Inception A/C/E blocks exclude padding (`count_include_pad=False`) and the last block
(Mixed_7c) max-pools its pool branch — BatchNorm eps 1e-3, 1008-way classifier. Outputs, as ADM's evaluator:

  pool     [N, 2048]  pool_3 (global average of Mixed_7c): FID, precision/recall;
  spatial  [N, 2023]  mixed_6/conv (= Mixed_6d.branch1x1 after BN+ReLU, 17×17×192), first 7 channels
                      flattened: sFID;
  logits   [N, 1008]  pool_3 @ W *without* the bias (ADM and torch-fidelity's "logits_unbiased"): IS.

Preprocessing (`preprocess`): images in [-1, 1] NHWC with 1 or 3 channels are mapped to [0, 255] and
rounded (what storing samples as uint8 does), gray is repeated to RGB, then resized to 299×299 with TF1's
`ResizeBilinear` (align_corners=False, no half-pixel offset, as inside the TF graph the ADM evaluator uses)
and normalised to (x − 128) / 128.

Weights: `load_inception_params(path)` reads a local file, never the network:
  *.npz        arrays under torchvision-style names (below), PyTorch layouts;
  *.pth / *.pt a PyTorch state dict with the same names (e.g. pytorch-fid's
               `pt_inception-2015-12-05-6726825d.pth` or torch-fidelity's
               `weights-inception-2015-12-05-6726825d.pth`); needs torch.
Expected names, for every BasicConv2d `X` (e.g. `Conv2d_1a_3x3`, `Mixed_6d.branch1x1`, `Mixed_7b.branch3x3_2a`):
  `X.conv.weight` [O, I, kh, kw], `X.bn.weight` (γ; optional, 1 if absent, as in the TF graph),
  `X.bn.bias`, `X.bn.running_mean`, `X.bn.running_var`; and `fc.weight` [1008, 2048], `fc.bias` [1008].
  `*.num_batches_tracked` and `AuxLogits.*` are ignored. `inception_param_names()` lists them all.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS   # 2023
BN_EPS = 1e-3


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm with its statistics as ordinary params (scale, bias, mean, var), so the whole
  network is one 'params' tree."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
  """conv (no bias) → BN → ReLU, torchvision's BasicConv2d."""
  features: int
  kernel: Sequence[int]
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg3(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool = False     # True for Mixed_7c (the FID graph's quirk)

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool_branch:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """The FID Inception-v3 on preprocessed input [N, 299, 299, 3] (see `preprocess`)."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)   # TF name of Mixed_6d is "mixed_6"
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, name="fc")
    fc(pool[:1])  # create the (biased) classifier's params; IS uses it without the bias, as ADM
    logits = pool @ fc.variables["params"]["kernel"]
    n = x.shape[0]
    return {"pool": pool, "spatial": mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(n, -1), "logits": logits}


def _tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False):
  output i samples input position i · n_in / n_out, clamped at the last pixel."""
  src = np.arange(n_out) * (n_in / n_out)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m.astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """NHWC bilinear resize to size×size with TF1's coordinate convention (as two small matmuls)."""
  rh = jnp.asarray(_tf1_resize_matrix(x.shape[1], size))
  rw = jnp.asarray(_tf1_resize_matrix(x.shape[2], size))
  x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", rw, x, precision=jax.lax.Precision.HIGHEST)


def preprocess(images: jax.Array, round_to_uint8: bool = True) -> jax.Array:
  """[-1, 1] NHWC (1 or 3 channels, any size) → the network's [N, 299, 299, 3] input in [-1, 1)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels in [-1, 1]; got shape {images.shape}")
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  if round_to_uint8:
    x = jnp.round(x)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = resize_bilinear_tf1(x, INPUT_SIZE)
  return (x - 128.0) / 128.0


# --- weights ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def param_shapes() -> dict:
  """{flax path tuple: shape} of every parameter (from `jax.eval_shape`, no computation)."""
  shapes = jax.eval_shape(InceptionV3FID().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))["params"]
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict) or hasattr(v, "items"):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = tuple(v.shape)

  walk(shapes, ())
  return flat


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_name(path: tuple) -> str:
  """Flax path → torchvision state-dict name, e.g. ('Mixed_6d', 'branch1x1', 'conv', 'kernel') →
  'Mixed_6d.branch1x1.conv.weight'."""
  *mods, leaf = path
  if mods[-1] == "bn":
    return ".".join(mods) + "." + _BN_NAMES[leaf]
  return ".".join(mods) + (".weight" if leaf == "kernel" else ".bias")


def inception_param_names() -> list[str]:
  """Every state-dict name the loader reads (BN `.weight` is optional)."""
  return sorted(_torch_name(p) for p in param_shapes())


def convert_state_dict(state: dict) -> dict:
  """A torchvision-style FID Inception state dict (numpy arrays, PyTorch layouts) → Flax params.

  Conv weights OIHW → HWIO, `fc.weight` (out, in) → kernel (in, out), BN weight/running stats → scale/
  mean/var. Missing names, unexpected names and shape mismatches are reported together."""
  state = {k: np.asarray(v) for k, v in state.items()
           if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
  params: dict = {}
  missing, bad_shape, used = [], [], set()
  for path, shape in param_shapes().items():
    name = _torch_name(path)
    if name not in state:
      if path[-2] == "bn" and path[-1] == "scale":   # the TF graph has no γ
        value = np.ones(shape, np.float32)
      else:
        missing.append(name)
        continue
    else:
      used.add(name)
      value = state[name]
      if path[-1] == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
      elif path[-1] == "kernel" and value.ndim == 2:
        value = value.T
      if tuple(value.shape) != shape:
        bad_shape.append(f"{name}: got {tuple(state[name].shape)}, expected the layout of Flax {shape}")
        continue
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.asarray(value, np.float32)
  unexpected = sorted(set(state) - used)
  if missing or bad_shape or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if bad_shape:
      parts.append(f"{len(bad_shape)} with wrong shapes ({'; '.join(bad_shape[:3])})")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    raise ValueError("FID Inception weights do not match the expected names/shapes: " + "; ".join(parts)
                     + ". See dqjax.metrics.inception.inception_param_names() for the expected names.")
  return params


def load_inception_params(path: str) -> dict:
  """Flax params of the FID Inception from a local .npz (torchvision-style names) or .pth/.pt state dict."""
  import os
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no FID Inception weights at {path}; expected a .npz or .pth file "
                            "(see the dqjax.metrics.inception docstring for the key names)")
  if path.endswith(".npz"):
    with np.load(path) as z:
      state = {k: z[k] for k in z.files}
  elif path.endswith((".pth", ".pt")):
    try:
      import torch
    except ImportError:
      raise ImportError(f"reading {path} needs torch (pip install 'dqjax[torch]'), or convert it to .npz "
                        "with the same key names") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.detach().float().numpy() for k, v in sd.items()}
  else:
    raise ValueError(f"FID Inception weights file {path!r} has an unknown extension; accepted: .npz, .pth, .pt")
  return convert_state_dict(state)


def load_inception(path: str, batch_size: int = 64) -> Callable[[np.ndarray], dict]:
  """`features(images [N,H,W,1|3] in [-1,1]) -> {'pool', 'spatial', 'logits'}` with the standard FID
  weights at `path`; one jitted forward of a fixed batch (ADM: 64), the last batch zero-padded."""
  params = jax.device_put(load_inception_params(path))
  model = InceptionV3FID()
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x)))

  def features(images: np.ndarray) -> dict:
    images = np.asarray(images, np.float32)
    outs = []
    for i in range(0, images.shape[0], batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
      out = jax.device_get(fwd(params, chunk))
      outs.append({k: np.asarray(v[:batch_size - pad]) for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  return features


def output_shapes(batch: int = 1, image_shape: Optional[Sequence[int]] = None) -> dict:
  """{'pool', 'spatial', 'logits'} shapes for `batch` images of `image_shape` (default 32×32×1), traced
  with `jax.eval_shape` through preprocessing and the network (no computation)."""
  image_shape = tuple(image_shape or (32, 32, 1))
  model = InceptionV3FID()
  x = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32)

  def run(images):
    inp = preprocess(images)
    params = model.init(jax.random.key(0), inp)["params"]
    return model.apply({"params": params}, inp)

  return {k: tuple(v.shape) for k, v in jax.eval_shape(run, x).items()}
