"""On-disk format of every shipped network: a directory holding

  config.json          a JSON object (architecture, training command, metrics: whatever the card needs);
  params.safetensors   the parameter tree flattened with '/'-joined keys ('b1_conv/kernel'), float32.

Writes are atomic: the directory is assembled in a temporary sibling and renamed into place with
`os.replace`, so a reader never sees half a network (other files already in the directory, such as the
README card, are carried over). Reads fail with an error naming the directory, the file and the problem.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

CONFIG = "config.json"
PARAMS = "params.safetensors"


def _flatten(tree: Any, prefix: str = "") -> dict:
  """{'a/b': leaf}; keys must be non-empty strings without '/' (they become path components)."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"params must be a nested mapping of arrays; got {type(tree).__name__} at {prefix or '<root>'!r}")
  out = {}
  for k, v in tree.items():
    if not isinstance(k, str) or not k or "/" in k:
      raise ValueError(f"params key {k!r} at {prefix or '<root>'!r} must be a non-empty string without '/'")
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      arr = np.asarray(v)
      if arr.dtype.kind in "OUSMm":
        raise TypeError(f"params leaf {name!r} has dtype {arr.dtype}; only numeric arrays can be saved")
      out[name] = np.array(arr, dtype=np.float32, order="C")  # keeps 0-d leaves 0-d
  return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_params(path: str, params: Any, config: dict) -> str:
  """Write `params` (a nested dict of arrays, stored as float32) and `config` to directory `path`,
  atomically; returns the absolute path."""
  from safetensors.numpy import save_file
  if not isinstance(config, dict):
    raise TypeError(f"config must be a dict (it becomes {CONFIG}); got {type(config).__name__}")
  try:
    config_text = json.dumps(config, indent=1, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config cannot be written as JSON ({e}); use plain numbers, strings, lists and dicts") from None
  flat = _flatten(params)
  if not flat:
    raise ValueError("params is empty: there is nothing to save")
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  old = None
  try:
    save_file(flat, os.path.join(tmp, PARAMS))
    with open(os.path.join(tmp, CONFIG), "w") as f:
      f.write(config_text + "\n")
    if os.path.isdir(path):  # carry over the card, grids, ... already in the directory
      for name in os.listdir(path):
        src = os.path.join(path, name)
        if name not in (CONFIG, PARAMS) and os.path.isfile(src):
          shutil.copy2(src, os.path.join(tmp, name))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shipped network is world-readable
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), 0o644)
    if os.path.isdir(path):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
      os.replace(path, os.path.join(old, "net"))
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and os.path.isdir(os.path.join(old, "net")) and not os.path.exists(path):
      os.replace(os.path.join(old, "net"), path)   # put the previous network back
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return path


def load_params(path: str) -> tuple[dict, dict]:
  """(params as a nested dict of float32 numpy arrays, config dict) from a directory written by
  `save_params`. Raises FileNotFoundError for a missing directory, ValueError for missing or corrupt files."""
  from safetensors.numpy import load_file
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no saved network at {path} (directory missing)")
  for name in (CONFIG, PARAMS):
    if not os.path.isfile(os.path.join(path, name)):
      raise ValueError(f"saved network at {path} is incomplete: {name} is missing")
  try:
    with open(os.path.join(path, CONFIG)) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"saved network at {path} is corrupt: {CONFIG} cannot be parsed ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"saved network at {path} is corrupt: {CONFIG} holds a {type(config).__name__}, "
                     "not a JSON object")
  try:
    flat = load_file(os.path.join(path, PARAMS))
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise ValueError(f"saved network at {path} is corrupt: {PARAMS} cannot be read ({e})") from None
  if not flat:
    raise ValueError(f"saved network at {path} is corrupt: {PARAMS} holds no tensors")
  for k, v in flat.items():
    if v.dtype != np.float32:
      raise ValueError(f"saved network at {path} is corrupt: {PARAMS} tensor {k!r} has dtype {v.dtype}; "
                       "expected float32")
  return _unflatten(flat), config
