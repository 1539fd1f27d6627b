"""Whole-file writes that a reader never sees half done: write a temporary file in the same directory, then
rename it over the target (`os.replace` is atomic on one file system). Directory-sized artefacts (networks,
checkpoints) have their own swap in `dqjax.zoo.io` and `dqjax.checkpoint`."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, IO


def write(path: str, fill: Callable[[IO], Any], mode: str = "w") -> str:
  """Create `path` atomically from `fill(file)`; a failure leaves the previous file (or none) in place."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      fill(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def write_text(path: str, text: str) -> str:
  return write(path, lambda f: f.write(text))


def write_json(path: str, obj: Any) -> str:
  return write(path, lambda f: json.dump(obj, f, indent=1))
