"""Load and export diffusers model directories (config.json + safetensors) without torch.

Names map mechanically: 'down_blocks.0.resnets.1.conv1.weight' → 'down_blocks_0/resnets_1/conv1/kernel'
(an index joins the name before it with '_'). Layouts: conv OIHW → HWIO, linear (out, in) → (in, out),
norm weight → scale, embedding weight → embedding. Old checkpoints' attention names
(query/key/value/proj_attn, also stored as 1×1 convs) are accepted. The result is checked against
`jax.eval_shape` of the Flax model's init: missing tensors, unexpected tensors and shape mismatches are listed
together in one error. Only `safetensors.numpy` is used to read and write.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dqjax.models import configs as cfgs

WEIGHTS_NAME = "diffusion_pytorch_model"
# diffusers class name → dqjax kind
CLASSES = {
    "UNet2DModel": "unet2d", "UNet2DConditionModel": "unet2d_condition", "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit", "AutoencoderKL": "autoencoder_kl", "VQModel": "vq_model",
}
# dqjax config class → the diffusers class written by export_diffusers
EXPORT_CLASS = {
    cfgs.UNet2DConfig: "UNet2DModel", cfgs.UNet2DConditionConfig: "UNet2DConditionModel",
    cfgs.DiTConfig: "DiTTransformer2DModel", cfgs.AutoencoderKLConfig: "AutoencoderKL",
    cfgs.VQModelConfig: "VQModel",
}
# diffusers ModuleLists: their index becomes its own '.'-separated part again on export
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "transformer_blocks",
          "to_out", "net")
_INDEXED = re.compile(r"(^|/)(" + "|".join(_LISTS) + r")_(\d+)(?=/|$)")
LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def build(kind: str, config: dict):
  """(Flax module, dqjax config) of `kind` from a diffusers config dict."""
  from dqjax import models
  table = {
      "unet2d": (cfgs.UNet2DConfig, models.UNet2DModel),
      "unet2d_condition": (cfgs.UNet2DConditionConfig, models.UNet2DConditionModel),
      "dit": (cfgs.DiTConfig, models.DiTTransformer2DModel),
      "autoencoder_kl": (cfgs.AutoencoderKLConfig, models.AutoencoderKL),
      "vq_model": (cfgs.VQModelConfig, models.VQModel),
  }
  if kind not in table:
    raise ValueError(f"model kind {kind!r} is unknown; accepted values: {', '.join(sorted(table))}")
  cfg_cls, model_cls = table[kind]
  c = cfg_cls.from_dict(config)
  return model_cls(c), c


def model_for(config) -> Any:
  """The Flax module for a dqjax config object."""
  from dqjax import models
  table = {cfgs.UNet2DConfig: models.UNet2DModel, cfgs.UNet2DConditionConfig: models.UNet2DConditionModel,
           cfgs.DiTConfig: models.DiTTransformer2DModel, cfgs.AutoencoderKLConfig: models.AutoencoderKL,
           cfgs.VQModelConfig: models.VQModel}
  if type(config) not in table:
    raise ValueError(f"config of type {type(config).__name__} is not a dqjax model config; accepted types: "
                     f"{', '.join(t.__name__ for t in table)}")
  return table[type(config)](config)


def example_inputs(config) -> tuple:
  """Small inputs that initialise the model of `config` (shapes of the parameters do not depend on them)."""
  if isinstance(config, (cfgs.AutoencoderKLConfig, cfgs.VQModelConfig)):
    s = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, s, s, config.in_channels)),)
  if isinstance(config, cfgs.DiTConfig):
    s = config.sample_size
  else:
    s = 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((1, s, s, config.in_channels))
  t = jnp.zeros((1,))
  if isinstance(config, cfgs.UNet2DConfig):
    return (x, t, None if config.num_class_embeds is None else jnp.zeros((1,), jnp.int32))
  if isinstance(config, cfgs.UNet2DConditionConfig):
    return (x, t, jnp.zeros((1, 1, config.per_block("cross_attention_dim")[0])))
  return (x, t, jnp.zeros((1,), jnp.int32))


def param_shapes(model, config) -> dict:
  """Flat {'a/b/kernel': ShapeDtypeStruct} of the model's parameters, without allocating them."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(config)))["params"]
  return traverse_util.flatten_dict(tree, sep="/")


def flax_module_path(pt_key: str) -> tuple[str, str]:
  """'down_blocks.0.resnets.1.conv1.weight' → ('down_blocks_0/resnets_1/conv1', 'weight')."""
  parts = pt_key.split(".")
  leaf = parts[-1]
  out: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  if out and out[-1] in LEGACY:
    out[-1] = LEGACY[out[-1]]
  return "/".join(out), leaf


def diffusers_key(flax_key: str) -> str:
  """'down_blocks_0/resnets_1/conv1/kernel' → 'down_blocks.0.resnets.1.conv1.weight' (inverse of loading)."""
  mod, leaf = flax_key.rsplit("/", 1)
  mod = _INDEXED.sub(lambda m: f"{m.group(1)}{m.group(2)}.{m.group(3)}", mod)
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return f"{mod.replace('/', '.')}.{leaf}"


def _to_flax(leaf: str, arr: np.ndarray, leaves: set, want: Optional[dict]) -> tuple[str, np.ndarray]:
  """The Flax leaf name and layout of one diffusers tensor, given the leaf names the module has."""
  if leaf != "weight":
    return leaf, arr
  if "kernel" in leaves:
    target = want.get("kernel") if want else None
    if arr.ndim == 4 and target is not None and len(target) == 2 and arr.shape[2:] == (1, 1):
      arr = arr[:, :, 0, 0]  # legacy attention projections stored as 1×1 convolutions
    return "kernel", (arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T)
  if "scale" in leaves:
    return "scale", arr
  if "embedding" in leaves:
    return "embedding", arr
  return leaf, arr


def _weights_files(model_dir: str, variant: Optional[str]) -> list[str]:
  name = WEIGHTS_NAME + (f".{variant}" if variant else "") + ".safetensors"
  single = os.path.join(model_dir, name)
  index = os.path.join(model_dir, name + ".index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object")
    return [os.path.join(model_dir, n) for n in sorted(set(weight_map.values()))]
  bins = [n for n in os.listdir(model_dir) if n.endswith(".bin")] if os.path.isdir(model_dir) else []
  hint = " (only PyTorch .bin weights found: re-save them with safe_serialization=True)" if bins else ""
  raise FileNotFoundError(f"{model_dir} has no {name} (nor {name}.index.json){hint}")


def load_state_dict(model_dir: str, variant: Optional[str] = None) -> dict[str, np.ndarray]:
  """All tensors of a diffusers directory (single file or shards), as float32 numpy arrays."""
  from safetensors.numpy import load_file
  out: dict[str, np.ndarray] = {}
  for path in _weights_files(model_dir, variant):
    for k, v in load_file(path).items():
      out[k] = np.asarray(v, np.float32)
  return out


def read_config(model_dir: str) -> dict:
  cpath = os.path.join(model_dir, "config.json")
  if not os.path.isfile(cpath):
    raise FileNotFoundError(f"{model_dir} has no config.json")
  with open(cpath) as f:
    return json.load(f)


def _prepare_config(cls: str, config: dict) -> dict:
  """Class-specific defaults diffusers fills in at construction."""
  config = dict(config)
  if cls == "Transformer2DModel":
    if config.get("patch_size") is None or config.get("norm_type") not in (None, "ada_norm_zero"):
      raise ValueError("only DiT-style Transformer2DModel checkpoints (patch_size set, norm_type "
                       f"'ada_norm_zero') are supported; got patch_size={config.get('patch_size')!r}, "
                       f"norm_type={config.get('norm_type')!r}")
    config.setdefault("norm_type", "ada_norm_zero")
    if config.get("interpolation_scale") is None:
      config["interpolation_scale"] = max(int(config.get("sample_size") or 32) // 64, 1)
  return config


def params_from_state_dict(state_dict: dict, model, config, name: str = "checkpoint") -> dict:
  """Flax params of `model` from a diffusers state dict; one ValueError lists every problem."""
  flat_t = param_shapes(model, config)
  leaves_at: dict[str, dict] = {}
  for k, v in flat_t.items():
    mod, leaf = k.rsplit("/", 1)
    leaves_at.setdefault(mod, {})[leaf] = tuple(v.shape)
  flat, unexpected, mismatched, mismatched_fk = {}, [], [], set()
  for key, arr in state_dict.items():
    arr = np.asarray(arr, np.float32)
    mod, leaf = flax_module_path(key)
    if mod not in leaves_at:
      unexpected.append(key)
      continue
    fleaf, val = _to_flax(leaf, arr, set(leaves_at[mod]), leaves_at[mod])
    fk = f"{mod}/{fleaf}"
    if fk not in flat_t:
      unexpected.append(key)
    elif tuple(flat_t[fk].shape) != val.shape:
      mismatched.append(f"{key}: checkpoint {tuple(arr.shape)} → {val.shape} vs model {tuple(flat_t[fk].shape)}")
      mismatched_fk.add(fk)
    elif fk in flat:
      unexpected.append(f"{key} (duplicate of {fk})")
    else:
      flat[fk] = jnp.asarray(val)
  missing = sorted(set(flat_t) - set(flat) - mismatched_fk)
  if missing or unexpected or mismatched:
    def fmt(items):
      return "none" if not items else "; ".join(items[:20]) + (f"; ... ({len(items)} in all)" if len(items) > 20
                                                               else "")
    raise ValueError(f"cannot load {name} into {type(model).__name__}: missing tensors: {fmt(missing)} | "
                     f"unexpected tensors: {fmt(sorted(unexpected))} | shape mismatches: {fmt(mismatched)}")
  return traverse_util.unflatten_dict(flat, sep="/")


def load_diffusers(model_dir: str, variant: Optional[str] = None):
  """(model, params, config) from a diffusers model directory (config.json + diffusion_pytorch_model
  [.variant].safetensors or its sharded .index.json). `variant` selects e.g. 'fp16' weights (cast to fp32)."""
  config = read_config(model_dir)
  cls = config.get("_class_name")
  if cls not in CLASSES:
    raise ValueError(f"{model_dir}/config.json: _class_name={cls!r} is not supported; accepted values: "
                     f"{', '.join(CLASSES)}")
  model, c = build(CLASSES[cls], _prepare_config(cls, config))
  params = params_from_state_dict(load_state_dict(model_dir, variant), model, c, name=model_dir)
  return model, params, c


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """diffusers state dict (numpy, torch layouts) of Flax params."""
  sd = {}
  for k, v in traverse_util.flatten_dict(params, sep="/").items():
    v = np.asarray(v, np.float32)
    if k.endswith("/kernel"):
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    sd[diffusers_key(k)] = np.ascontiguousarray(v)
  return sd


def export_diffusers(model_dir: str, config, params) -> str:
  """Write `params` as a diffusers directory (config.json + diffusion_pytorch_model.safetensors), atomically:
  everything is written to a temporary directory beside `model_dir`, then renamed into place."""
  from safetensors.numpy import save_file
  if type(config) not in EXPORT_CLASS:
    raise ValueError(f"config of type {type(config).__name__} cannot be exported; accepted types: "
                     f"{', '.join(t.__name__ for t in EXPORT_CLASS)}")
  model = model_for(config)
  sd = state_dict_from_params(params)
  # refuse to write a directory that would not load back
  params_from_state_dict(sd, model, config, name="params")
  model_dir = os.path.abspath(model_dir)
  parent = os.path.dirname(model_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
  try:
    save_file(sd, os.path.join(tmp, WEIGHTS_NAME + ".safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({"_class_name": EXPORT_CLASS[type(config)], **config.to_dict()}, f, indent=2, sort_keys=True)
    if os.path.exists(model_dir):
      old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
      os.replace(model_dir, os.path.join(old, "x"))
      os.replace(tmp, model_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, model_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return model_dir
