"""On-disk format of every shipped network: `config.json` + `params.safetensors` (float32, '/'-joined
keys), written atomically (a temporary directory renamed into place)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import traverse_util

CONFIG = "config.json"
PARAMS = "params.safetensors"


def save_params(path: str, params: Any, config: dict) -> str:
  from safetensors.numpy import save_file
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    save_file(flat, os.path.join(tmp, PARAMS))
    with open(os.path.join(tmp, CONFIG), "w") as f:
      json.dump(config, f, indent=1, sort_keys=True)
    # keep any other files (model card, grids) already in the directory
    if os.path.isdir(path):
      for name in os.listdir(path):
        if name not in (CONFIG, PARAMS):
          shutil.copy2(os.path.join(path, name), os.path.join(tmp, name))
      old = path + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def load_params(path: str) -> tuple[Any, dict]:
  from safetensors.numpy import load_file
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no saved network at {path} (directory missing)")
  for name in (CONFIG, PARAMS):
    if not os.path.isfile(os.path.join(path, name)):
      raise ValueError(f"saved network at {path} is incomplete: {name} is missing")
  try:
    with open(os.path.join(path, CONFIG)) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"saved network at {path} is corrupt: {CONFIG} cannot be parsed ({e})") from None
  try:
    flat = load_file(os.path.join(path, PARAMS))
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise ValueError(f"saved network at {path} is corrupt: {PARAMS} cannot be read ({e})") from None
  return traverse_util.unflatten_dict(flat, sep="/"), config
