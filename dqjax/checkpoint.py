"""Checkpoints of quantized models: orbax arrays + a JSON header, written atomically, with a format version.

Layout of a checkpoint directory:
  header.json   format version, the plan (specs per op), sampler-correction names, user metadata
  arrays/       orbax PyTree checkpoint of {params, fp_params?, qstate, corrections}
The directory is assembled under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a reader would find it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.quant.ops import QParams
from dqjax.transform.rules import Plan
from dqjax.transform.state import ActQuant, OpState

FORMAT_VERSION = 1
HEADER = "header.json"
ARRAYS = "arrays"


class CheckpointError(ValueError):
  pass


# --- qstate <-> plain nested dicts (orbax stores dicts of arrays) ----------------------------------------
def _qp_to(qp: QParams) -> dict:
  d = {"scale": qp.scale}
  if qp.zero_point is not None:
    d["zero_point"] = qp.zero_point
  return d


def _qp_from(d: dict) -> QParams:
  return QParams(scale=jnp.asarray(d["scale"]), zero_point=None if "zero_point" not in d else
                 jnp.asarray(d["zero_point"]))


def opstate_to_dict(st: OpState) -> dict:
  d: dict[str, Any] = {}
  for name in ("weight", "weight_split"):
    if getattr(st, name) is not None:
      d[name] = _qp_to(getattr(st, name))
  for name in ("rounding", "smooth", "rotate"):
    if getattr(st, name) is not None:
      d[name] = getattr(st, name)
  for name in ("lowrank", "lora"):
    if getattr(st, name) is not None:
      a, b = getattr(st, name)
      d[name] = {"a": a, "b": b}
  if st.acts:
    d["acts"] = {k: {"qp": _qp_to(v.qp), **({"index": v.index} if v.index is not None else {})}
                 for k, v in st.acts.items()}
  if st.extra:
    d["extra"] = dict(st.extra)
  return d


def opstate_from_dict(d: dict) -> OpState:
  kw: dict[str, Any] = {}
  for name in ("weight", "weight_split"):
    if name in d:
      kw[name] = _qp_from(d[name])
  for name in ("rounding", "smooth", "rotate"):
    if name in d:
      kw[name] = jnp.asarray(d[name])
  for name in ("lowrank", "lora"):
    if name in d:
      kw[name] = (jnp.asarray(d[name]["a"]), jnp.asarray(d[name]["b"]))
  if "acts" in d:
    kw["acts"] = {k: ActQuant(_qp_from(v["qp"]), None if "index" not in v else jnp.asarray(v["index"]))
                  for k, v in d["acts"].items()}
  if "extra" in d:
    kw["extra"] = jax.tree_util.tree_map(jnp.asarray, dict(d["extra"]))
  return OpState(**kw)


def _escape(path: str) -> str:
  # orbax keys must not contain '/', which module paths do.
  return path.replace("/", "|")


def _unescape(key: str) -> str:
  return key.replace("|", "/")


def qstate_to_dict(qstate: dict) -> dict:
  return {_escape(p): opstate_to_dict(st) for p, st in qstate.items()}


def qstate_from_dict(d: dict) -> dict:
  return {_unescape(k): opstate_from_dict(v) for k, v in d.items()}


def _drop_empty(tree):
  """orbax cannot store empty dicts; prune them (restore treats a missing field as None)."""
  if isinstance(tree, dict):
    out = {k: _drop_empty(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
  return tree


# --- save / restore ---------------------------------------------------------------------------------------
def save(path: str, plan: Plan, params: Any, qstate: dict, *, corrections: Optional[dict] = None,
         fp_params: Any = None, metadata: Optional[dict] = None, overwrite: bool = True) -> str:
  """Write a checkpoint atomically. `corrections`: {name: state pytree} of attached sampler corrections."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"checkpoint {path} exists and overwrite=False")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    arrays = {"params": params, "qstate": qstate_to_dict(qstate)}
    if fp_params is not None:
      arrays["fp_params"] = fp_params
    if corrections:
      arrays["corrections"] = dict(corrections)
    arrays = _drop_empty(jax.tree_util.tree_map(jnp.asarray, arrays))
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, ARRAYS), arrays)
    header = {"format_version": FORMAT_VERSION, "plan": plan.to_json(),
              "corrections": sorted((corrections or {}).keys()), "metadata": metadata or {},
              "has_fp_params": fp_params is not None}
    with open(os.path.join(tmp, HEADER), "w") as f:
      json.dump(header, f, indent=1, default=_json_default)
    if os.path.exists(path):
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


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def read_header(path: str) -> dict:
  hp = os.path.join(path, HEADER)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path} (directory missing)")
  if not os.path.isfile(hp):
    raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {HEADER} is missing")
  try:
    with open(hp) as f:
      header = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {path} is corrupt: {HEADER} cannot be parsed ({e})") from None
  version = header.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointError(f"checkpoint {path} has format_version={version!r}; this dqjax reads version "
                          f"{FORMAT_VERSION}")
  return header


def restore(path: str, *, expect_plan: Optional[Plan] = None) -> dict:
  """Read a checkpoint: {'plan', 'params', 'qstate', 'corrections', 'fp_params', 'metadata'}.

  With `expect_plan`, a checkpoint made for another model (different op paths or specs) is refused with
  the list of differences.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  header = read_header(path)
  plan = Plan.from_json(header["plan"])
  if expect_plan is not None:
    _check_plan(path, plan, expect_plan)
  apath = os.path.join(path, ARRAYS)
  if not os.path.isdir(apath):
    raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {ARRAYS}/ is missing")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      arrays = ocp.PyTreeCheckpointer().restore(apath)
  except Exception as e:  # orbax raises many kinds; all mean the same to the user
    raise CheckpointError(f"checkpoint {path} is corrupt: its arrays cannot be read ({type(e).__name__}: "
                          f"{e})") from None
  arrays = jax.tree_util.tree_map(jnp.asarray, arrays)
  return {"plan": plan, "params": arrays["params"], "qstate": qstate_from_dict(arrays.get("qstate", {})),
          "corrections": arrays.get("corrections", {}), "fp_params": arrays.get("fp_params"),
          "metadata": header.get("metadata", {})}


def _check_plan(path: str, got: Plan, want: Plan):
  g, w = set(got.paths), set(want.paths)
  problems = []
  if g - w:
    problems.append("unexpected ops: " + ", ".join(sorted(g - w)))
  if w - g:
    problems.append("missing ops: " + ", ".join(sorted(w - g)))
  for p in sorted(g & w):
    a, b = got[p], want[p]
    if a.info.weight_shape != b.info.weight_shape:
      problems.append(f"{p}: weight shape {a.info.weight_shape} != expected {b.info.weight_shape}")
    elif (a.weight, a.acts) != (b.weight, b.acts):
      problems.append(f"{p}: quantization specs differ")
  if problems:
    raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems[:20]))
