"""Load and export diffusers model directories (config.json + safetensors) without torch.

Names map mechanically: 'down_blocks.0.resnets.1.conv1.weight' → down_blocks_0/resnets_1/conv1/kernel.
Layouts: conv OIHW → HWIO, linear (out, in) → (in, out), norm weight → scale, embedding weight →
embedding. Old checkpoints' attention names (query/key/value/proj_attn) are accepted. The result is checked
against an abstract init of the Flax model: missing tensors, unexpected tensors and shape mismatches are
listed in one error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dqjax.models import configs as cfgs

CLASSES = {
    "UNet2DModel": "unet2d", "UNet2DConditionModel": "unet2d_condition", "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit", "AutoencoderKL": "autoencoder_kl",
}
_INDEXED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|"
                      r"to_out|net)_(\d+)")
LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def build(kind: str, config: dict):
  from dqjax import models
  if kind == "unet2d":
    c = cfgs.UNet2DConfig.from_dict(config)
    return models.UNet2DModel(c), c
  if kind == "unet2d_condition":
    c = cfgs.UNet2DConditionConfig.from_dict(config)
    return models.UNet2DConditionModel(c), c
  if kind == "dit":
    c = cfgs.DiTConfig.from_dict(config)
    return models.DiTTransformer2DModel(c), c
  if kind == "autoencoder_kl":
    c = cfgs.AutoencoderKLConfig.from_dict(config)
    return models.AutoencoderKL(c), c
  raise ValueError(f"model kind {kind!r} is unknown; accepted values: {', '.join(sorted(set(CLASSES.values())))}")


def _example_inputs(kind: str, c):
  if kind == "autoencoder_kl":
    return (jnp.zeros((1, 8 * 2 ** (len(c.block_out_channels) - 1), 8 * 2 ** (len(c.block_out_channels) - 1),
                       c.in_channels)),)
  size = c.sample_size or 8
  x = jnp.zeros((1, size, size, c.in_channels))
  t = jnp.zeros((1,))
  if kind == "unet2d":
    return (x, t, None if c.num_class_embeds is None else jnp.zeros((1,), jnp.int32))
  if kind == "unet2d_condition":
    return (x, t, jnp.zeros((1, 4, c.cross_attention_dim)))
  return (x, t, jnp.zeros((1,), jnp.int32))


def _flax_key(pt_key: str) -> tuple[str, str]:
  """('down_blocks_0/resnets_1/conv1', 'weight')."""
  parts = pt_key.split(".")
  parts = [LEGACY.get(p, p) for p in parts]
  parts = ".".join(parts).split(".")
  leaf = parts[-1]
  out = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return "/".join(out), leaf


def _to_flax(leaf: str, arr: np.ndarray, template_leaves: set) -> tuple[str, np.ndarray]:
  if leaf == "bias":
    return "bias", arr
  if "kernel" in template_leaves:
    if arr.ndim == 4:
      return "kernel", arr.transpose(2, 3, 1, 0)
    return "kernel", arr.T
  if "scale" in template_leaves:
    return "scale", arr
  if "embedding" in template_leaves:
    return "embedding", arr
  return leaf, arr


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  single = os.path.join(model_dir, "diffusion_pytorch_model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
      out.update(load_file(os.path.join(model_dir, name)))
    return out
  raise FileNotFoundError(f"{model_dir} has no diffusion_pytorch_model.safetensors (or its .index.json)")


def load_diffusers(model_dir: str):
  """(model, params, config) from a diffusers model directory."""
  cpath = os.path.join(model_dir, "config.json")
  if not os.path.isfile(cpath):
    raise FileNotFoundError(f"{model_dir} has no config.json")
  with open(cpath) as f:
    config = json.load(f)
  cls = config.get("_class_name")
  if cls not in CLASSES:
    raise ValueError(f"config.json _class_name={cls!r} is not supported; accepted values: {', '.join(CLASSES)}")
  kind = CLASSES[cls]
  model, c = build(kind, config)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), *_example_inputs(kind, c)))["params"]
  flat_t = traverse_util.flatten_dict(template, sep="/")
  leaves_at: dict[str, set] = {}
  for k in flat_t:
    mod, leaf = k.rsplit("/", 1)
    leaves_at.setdefault(mod, set()).add(leaf)
  sd = load_state_dict(model_dir)
  flat, unexpected, mismatched = {}, [], []
  for key, arr in sd.items():
    arr = np.asarray(arr, np.float32)
    mod, leaf = _flax_key(key)
    if mod not in leaves_at:
      unexpected.append(key)
      continue
    name, val = _to_flax(leaf, arr, leaves_at[mod])
    fk = f"{mod}/{name}"
    if fk not in flat_t:
      unexpected.append(key)
    elif tuple(flat_t[fk].shape) != val.shape:
      mismatched.append(f"{key}: checkpoint {val.shape} vs model {tuple(flat_t[fk].shape)}")
    else:
      flat[fk] = jnp.asarray(val)
  missing = sorted(set(flat_t) - set(flat))
  if missing or unexpected or mismatched:
    raise ValueError(f"cannot load {model_dir} into {cls}: missing tensors {missing[:20]}"
                     f"{' ...' if len(missing) > 20 else ''}; unexpected tensors {unexpected[:20]}; "
                     f"shape mismatches {mismatched[:20]}")
  return model, traverse_util.unflatten_dict(flat, sep="/"), c


def export_diffusers(model_dir: str, class_name: str, config, params) -> str:
  """Write a diffusers directory (config.json + safetensors) atomically."""
  from safetensors.numpy import save_file
  if class_name not in CLASSES:
    raise ValueError(f"class_name={class_name!r}; accepted values: {', '.join(CLASSES)}")
  sd = {}
  for k, v in traverse_util.flatten_dict(params, sep="/").items():
    mod, leaf = k.rsplit("/", 1)
    v = np.asarray(v, np.float32)
    if leaf == "kernel":
      v, leaf = (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T), "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    pt = _INDEXED.sub(r"\1.\2", mod).replace("/", ".")
    sd[f"{pt}.{leaf}"] = np.ascontiguousarray(v)
  parent = os.path.dirname(os.path.abspath(model_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({"_class_name": class_name, **config.to_dict()}, f, indent=1)
    if os.path.exists(model_dir):
      shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return model_dir
