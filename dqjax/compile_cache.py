"""A persistent XLA compile cache for the command-line jobs.

Row after row, a bench compiles programs it has compiled before (the sampler of every method with the same
plan structure, the calibration passes, the metrics); jit's in-memory cache misses them because each row
builds new closures, while the persistent cache is keyed by the compiled program itself. Executables read
back are the ones XLA built, so results are bit-identical with or without the cache.
"""
from __future__ import annotations

import os

import jax

ENV_VAR = "DQJAX_COMPILE_CACHE"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dqjax", "xla")


def enable(path: str | None = None, min_compile_seconds: float = 0.5) -> str:
  """Cache compiled programs under `path` (default `$DQJAX_COMPILE_CACHE`, else ~/.cache/dqjax/xla);
  `DQJAX_COMPILE_CACHE=off` disables it. Returns the directory used ('' when off)."""
  path = path if path is not None else os.environ.get(ENV_VAR, DEFAULT_DIR)
  if path.strip().lower() in ("", "off", "0", "none"):
    return ""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path
