"""The benchmark: quantize zoo models with registered methods at the survey's bit settings and measure
them the way the survey does, plus paired fidelity against FP from identical noise.

One *row* = (model, method, bit setting). Rows are written to `<workdir>/rows/*.json` as soon as they are
done, so an interrupted run restarted with the same workdir resumes where it stopped. With `workers > 1` the
quantized rows run in that many worker processes (one XLA CPU process keeps about one core busy); the FP
rows, which every other row is paired with, always run first in the calling process.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dqjax import atomic
from dqjax.benchmark import costs
from dqjax.calib.data import CalibData, from_trajectory, select
from dqjax.methods import recipe as recipe_lib
from dqjax.quant.spec import parse_bits

FP_METHOD = "fp"
BASELINES = ("minmax", "mse")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """A validated benchmark suite (built from an ml_collections config by `suite_from_config`)."""
  models: tuple[str, ...]
  methods: tuple[str, ...]               # may contain 'all' (every registered method for the model family)
  settings: tuple[str, ...]              # 'W8A8', 'W4A8', ...
  num_samples: int = 256                 # evaluation samples per row
  batch_size: int = 128
  calib_samples: int = 64                # calibration samples per selected step
  calib_steps: int = 10                  # selected steps of the FP trajectory
  calib_policy: str = "uniform"
  seed: int = 0
  save_grids: bool = True
  method_overrides: tuple = ()           # ((method, {field: value}), ...) applied on top of method configs
  workers: int = 1                       # processes running the quantized rows side by side


def _positive(name, v):
  if not isinstance(v, int) or v <= 0:
    raise ValueError(f"bench config field {name}={v!r} must be a positive integer")


def suite_from_config(cfg: Any) -> SuiteConfig:
  """Validate a bench config before any heavy work; every error names the field and the accepted values."""
  from dqjax import zoo
  models = tuple(cfg.models)
  for m in models:
    if m not in zoo.NAMES:
      raise ValueError(f"bench config field models has unknown model {m!r}; accepted values: "
                       f"{', '.join(zoo.NAMES)}")
  known = recipe_lib.available()
  methods = tuple(cfg.methods)
  for m in methods:
    if m not in known and m not in ("all", FP_METHOD):
      raise ValueError(f"bench config field methods has unknown method {m!r}; accepted values: all, "
                       f"{', '.join(known)}")
  settings = tuple(str(s).upper() for s in cfg.settings)
  for s in settings:
    try:
      parse_bits(s)
    except ValueError as e:
      raise ValueError(f"bench config field settings: {e}") from None
  for name in ("num_samples", "batch_size", "calib_samples", "calib_steps", "workers"):
    _positive(name, int(cfg.get(name, 1)) if not isinstance(cfg.get(name, 1), int) else cfg.get(name, 1))
  from dqjax.calib.data import SELECTIONS
  policy = cfg.get("calib_policy", "uniform")
  if policy not in SELECTIONS:
    raise ValueError(f"bench config field calib_policy={policy!r}; accepted values: {', '.join(SELECTIONS)}")
  overrides = tuple((k, dict(v)) for k, v in dict(cfg.get("method_overrides", {})).items())
  for k, _ in overrides:
    if k not in recipe_lib.available():
      raise ValueError(f"bench config field method_overrides has unknown method {k!r}; accepted values: "
                       f"{', '.join(recipe_lib.available())}")
  return SuiteConfig(models, methods, settings, cfg.num_samples, cfg.batch_size, cfg.calib_samples,
                     cfg.calib_steps, policy, cfg.get("seed", 0), cfg.get("save_grids", True), overrides,
                     cfg.get("workers", 1))


def parse_method_overrides(text: str) -> dict:
  """--method_overrides JSON → {method: {config field: value}}, or a ValueError naming the flag and the shape."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--method_overrides is not JSON ({e}); expected {{method: {{field: value}}}}") from None
  if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
    raise ValueError("--method_overrides must be a JSON object {method: {field: value}}")
  return value


def method_config(name: str, overrides: dict | None = None):
  """The method's config from configs/methods/<name>.py (None if it has none), with overrides applied.

  A missing `configs` package is an error, not "no config": every method would silently fall back to its
  code defaults (a script run from outside the repository without dqjax installed)."""
  import importlib
  try:
    mod = importlib.import_module(f"configs.methods.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"configs.methods.{name}":
      raise ModuleNotFoundError(f"the method configs (package `configs.methods`) are not importable: {e}. "
                                "Install dqjax (pip install -e .; it ships `configs`) or run from the "
                                "repository root") from e
    cfg = None
  else:
    cfg = mod.get_config()
  if overrides:
    import ml_collections
    cfg = cfg if cfg is not None else ml_collections.ConfigDict()
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _null():
      for k, v in overrides.items():
        cfg[k] = v
  return cfg


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# --- one model's shared state: FP trajectory, references ------------------------------------------------
@dataclasses.dataclass
class ModelRun:
  entry: Any                 # zoo entry
  noise: jax.Array           # [N, ...] fixed initial noise
  conds: Any                 # conditioning for the N eval samples (or None)
  labels: Optional[np.ndarray]
  fp_images: np.ndarray      # decoded FP samples [N, 32, 32, 1]
  fp_traj: Any               # FP trajectory of the first batch (paired per-step errors)
  calib: CalibData


def _batches(n, bs):
  for i in range(0, n, bs):
    yield slice(i, min(n, i + bs))


def sample_images(entry, denoise, noise, conds, key, *, correction=None, batch_size=128, trajectory=False):
  """Decoded images for all initial noises (batched); optionally the trajectory of the first batch."""
  from dqjax.diffusion import samplers
  outs, traj = [], None
  guided = entry.guided(denoise)
  run = jax.jit(lambda x, c, k: samplers.sample(guided, entry.schedule, entry.sampler, x, k, c,
                                                correction=correction, return_trajectory=trajectory))
  for i, sl in enumerate(_batches(noise.shape[0], batch_size)):
    c = None if conds is None else jax.tree_util.tree_map(lambda a: a[sl], conds)
    res = run(noise[sl], c, jax.random.fold_in(key, i))
    if trajectory and traj is None:
      traj = res.trajectory
    outs.append(np.asarray(entry.decode(res.x0)))
  return np.concatenate(outs), traj


def prepare_model(name: str, suite: SuiteConfig) -> ModelRun:
  from dqjax import zoo
  entry = zoo.load(name)
  key = jax.random.key(suite.seed)
  k_noise, k_cond, k_cal = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, (suite.num_samples,) + tuple(entry.sample_shape))
  conds, labels = entry.eval_conditioning(k_cond, suite.num_samples)
  fp_images, fp_traj = sample_images(entry, entry.fp_denoiser(), noise, conds, jax.random.key(suite.seed + 1),
                                     batch_size=suite.batch_size, trajectory=True)
  calib = calibration_data(entry, suite, k_cal)
  return ModelRun(entry, noise, conds, labels, fp_images, fp_traj, calib)


def calibration_data(entry, suite: SuiteConfig, key) -> CalibData:
  """FP trajectories of fresh noise → the exact denoiser inputs at every step → the selected steps."""
  from dqjax.diffusion import samplers
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (suite.calib_samples,) + tuple(entry.sample_shape))
  conds, _ = entry.eval_conditioning(k2, suite.calib_samples)
  res = jax.jit(lambda x, c, k: samplers.sample(entry.guided(entry.fp_denoiser()), entry.schedule,
                                                entry.sampler, x, k, c, return_trajectory=True))(x, conds, k3)
  model_conds = entry.model_conditioning(conds)   # what the network itself receives (CFG doubles the batch)
  xs = res.trajectory.xs
  if model_conds is not None and jax.tree_util.tree_leaves(model_conds)[0].shape[0] != xs.shape[1]:
    xs = jnp.concatenate([xs, xs], axis=1)        # CFG: the network sees every x twice (cond, null)
  data = from_trajectory(xs, res.trajectory.ts, model_conds)
  return select(data, suite.calib_policy, min(suite.calib_steps, data.num_steps), seed=suite.seed)


def quantize_entry(entry, method: str, calib: CalibData, w_bits: int, a_bits: int, config: Any = None):
  """A zoo entry's network quantized by a registered method (`config`: the method's config; default the
  one in configs/methods/<method>.py) — the one call the bench, `quantize` and `analyze` share."""
  rec = recipe_lib.build(method, config if config is not None else method_config(method))
  return rec(entry.model, entry.params, entry.example_args(2), calib, w_bits=w_bits, a_bits=a_bits,
             model_family=entry.family, num_train_timesteps=entry.num_train_timesteps, env=entry.env())


def restore_quantized(path: str, entry, expected: dict):
  """The QModel saved at `path` for a zoo entry, or None — with the reason printed — when it cannot be
  rebuilt here (missing, corrupt, unknown correction) or its metadata differs from `expected` (a
  checkpoint made for another model, method or setting must be quantized again, not reused)."""
  from dqjax import checkpoint
  try:
    saved = checkpoint.restore(path)
    corrections = tuple(recipe_lib.correction_from_checkpoint(n, s) for n, s in saved["corrections"].items())
  except (ValueError, FileNotFoundError) as e:
    print(f"not reusing {path}: {e}")
    return None
  meta = {k: v for k, v in saved["metadata"].items() if v is not None}
  stale = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
  if stale:
    print(f"not reusing {path}: it was made for "
          + ", ".join(f"{k}={was!r} (now {now!r})" for k, (was, now) in stale.items()))
    return None
  qm = recipe_lib.QModel(entry.model, saved["plan"], saved["params"], saved["qstate"], entry.params,
                         entry.num_train_timesteps, corrections, meta, entry.env())
  return recipe_lib.with_forward(qm, meta.get("forward", "QModel"))   # the method's own quantized forward


# --- one row ----------------------------------------------------------------------------------------
def run_row(run: ModelRun, method: str, setting: str, suite: SuiteConfig) -> dict:
  from dqjax import metrics
  entry = run.entry
  w_bits, a_bits = parse_bits(setting) if method != FP_METHOD else (32, 32)
  start = time.perf_counter()
  if method == FP_METHOD:
    denoise, correction, plan, qm = entry.fp_denoiser(), None, None, None
  else:
    qm = quantize_entry(entry, method, run.calib, w_bits, a_bits,
                        method_config(method, dict(suite.method_overrides).get(method)))
    jax.block_until_ready(jax.tree_util.tree_leaves(qm.qstate))
    denoise, correction, plan = qm.denoiser(), qm.correction, qm.plan
  quant_seconds = time.perf_counter() - start
  images, traj = sample_images(entry, denoise, run.noise, run.conds, jax.random.key(suite.seed + 1),
                               correction=correction, batch_size=suite.batch_size, trajectory=True)
  scores = metrics.evaluate_samples(images, run.labels)
  row = {"model": entry.name, "method": method, "setting": "FP" if method == FP_METHOD else setting,
         "w_bits": w_bits, "a_bits": a_bits, **{k: _f(v) for k, v in scores.items()},
         "psnr": _f(metrics.psnr(images, run.fp_images)), "ssim": _f(metrics.ssim(images, run.fp_images)),
         "traj_mse": [float(v) for v in np.asarray(metrics.trajectory_mse(traj.xs, run.fp_traj.xs))],
         "quant_seconds": quant_seconds, "num_samples": int(images.shape[0])}
  row.update(costs.row_costs(entry, plan))
  row["family"] = "FP" if method == FP_METHOD else recipe_lib.get(method).family
  row["row_seconds"] = time.perf_counter() - start   # quantization + sampling + metrics of this row
  return row, images


def _f(v):
  v = float(v)
  return v if np.isfinite(v) else (float("inf") if v > 0 else float("-inf"))


def rows_for(suite: SuiteConfig, family: str) -> list[tuple[str, str]]:
  """(method, setting) pairs of a model family: FP once, then every requested method × setting (or the
  method's own settings, when it accepts only those)."""
  methods = []
  for m in suite.methods:
    if m == "all":
      methods += [n for n in recipe_lib.available(family) if n not in methods]
    elif m != FP_METHOD and family in recipe_lib.get(m).model_families and m not in methods:
      methods.append(m)
  # Baselines first, so that a partial (interrupted) run already has the rows every method is compared to.
  order = {m: i for i, m in enumerate(methods)}
  methods = sorted(methods, key=lambda m: (m not in BASELINES, order[m]))
  # A method that accepts only its own settings (BiDM: W1A1) runs there instead of the suite's settings.
  return [(FP_METHOD, "FP")] + [(m, s) for m in methods for s in (recipe_lib.get(m).settings or suite.settings)]


def row_path(workdir: str, model: str, method: str, setting: str) -> str:
  return os.path.join(workdir, "rows", f"{model}__{method}__{setting}.json")


def planned_rows(suite: SuiteConfig) -> list[tuple[str, str, str]]:
  """Every (model, method, setting) row of the suite, in the order the suite runs them."""
  from dqjax import zoo
  return [(m, meth, s) for m in suite.models for meth, s in rows_for(suite, zoo.family_of(m))]


def load_rows(workdir: str) -> list[dict]:
  """Every finished row in `workdir`, whichever suites or invocations wrote them (sorted by file name)."""
  rows_dir = os.path.join(workdir, "rows")
  if not os.path.isdir(rows_dir):
    return []
  out = []
  for name in sorted(os.listdir(rows_dir)):
    if name.endswith(".json"):
      with open(os.path.join(rows_dir, name)) as f:
        out.append(json.load(f))
  return out


_CSV_TEXT = ("model", "family", "method", "setting")
_CSV_INT = ("w_bits", "a_bits", "num_samples")


def seed_rows_from_csv(csv_path: str, workdir: str) -> int:
  """Write every row of a committed results CSV (e.g. docs/results/survey.csv) that `workdir` does not hold yet
  as a finished row, so that a run on a new machine resumes instead of recomputing them; returns how many.

  A restored row has the CSV's columns only (no per-step errors `traj_mse`, grids or samples) and is marked
  `restored_from_csv`; floats round-trip exactly (the CSV holds their repr)."""
  import csv
  if not os.path.isfile(csv_path):
    raise ValueError(f"--seed_rows_from={csv_path!r}: no such file; give a results CSV such as "
                     "docs/results/survey.csv")
  os.makedirs(os.path.join(workdir, "rows"), exist_ok=True)
  written = 0
  with open(csv_path, newline="") as f:
    for line, rec in enumerate(csv.DictReader(f), start=2):
      try:
        row = {k: (v if k in _CSV_TEXT else None if v == "" else int(v) if k in _CSV_INT else float(v))
               for k, v in rec.items() if k is not None}
        path = row_path(workdir, row["model"], row["method"], row["setting"])
      except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"--seed_rows_from={csv_path!r}: line {line} is not a results row ({e})") from None
      if not os.path.exists(path):
        atomic.write_json(path, {**row, "restored_from_csv": True})
        written += 1
  return written


def run_suite(suite: SuiteConfig, workdir: str) -> list[dict]:
  """Run every row not already in `workdir` and return all rows (done before + now), in suite order."""
  os.makedirs(os.path.join(workdir, "rows"), exist_ok=True)
  todo = planned_rows(suite)
  done = {}
  for key in todo:
    if os.path.exists(row_path(workdir, *key)):
      with open(row_path(workdir, *key)) as f:
        done[key] = json.load(f)
  pending = [key for key in todo if key not in done]
  bar = tqdm(total=len(pending), desc="bench", unit="row")

  def finish(key, row, images):
    _save_row(workdir, key, row, images, suite.save_grids)
    done[key] = row
    bar.update()

  # Every row is paired with its model's FP samples, so models are prepared and FP rows run first, here.
  runs = {m: prepare_model(m, suite) for m in dict.fromkeys(m for m, _, _ in pending)}
  for key in [k for k in pending if k[1] == FP_METHOD]:
    bar.set_postfix_str(" ".join(key))
    finish(key, *_safe_row(runs[key[0]], key[1], key[2], suite))
  quantized = [k for k in pending if k[1] != FP_METHOD]
  if suite.workers > 1 and len(quantized) > 1:
    _run_in_workers(quantized, runs, suite, workdir, finish, bar)
  else:
    for key in quantized:
      bar.set_postfix_str(" ".join(key))
      finish(key, *_safe_row(runs[key[0]], key[1], key[2], suite))
  bar.close()
  return [done[k] for k in todo if k in done]


def _safe_row(run: ModelRun, method: str, setting: str, suite: SuiteConfig):
  """run_row, or an error row: a method that refuses a setting (e.g. BiDM is W1A1 only) must not stop the suite."""
  try:
    return run_row(run, method, setting, suite)
  except Exception as e:
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    print(f"row {run.entry.name} {method} {setting} failed: {msg}")
    return {"model": run.entry.name, "method": method, "setting": setting, "error": msg,
            "family": recipe_lib.get(method).family}, None


def _save_row(workdir: str, key: tuple[str, str, str], row: dict, images, save_grids: bool):
  from dqjax.benchmark import report
  name = "__".join(key)
  if images is not None and save_grids:
    report.save_grid(images[:64], os.path.join(workdir, "grids", f"{name}.png"))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    np.save(os.path.join(workdir, "samples", f"{name}.npy"), images[:16])
  atomic.write_json(row_path(workdir, *key), row)


# --- worker processes ----------------------------------------------------------------------------------
_WORKER_RUNS: dict[str, ModelRun] = {}


def _run_in_workers(keys, runs: dict[str, ModelRun], suite: SuiteConfig, workdir: str, finish, bar):
  """Run rows in `suite.workers` spawned processes, each handed the prepared models (the same noise, FP
  samples and calibration data as a serial run, so rows are bit-identical to it). The
  parent writes every row; workers' own progress and logs go to <workdir>/logs/worker-<pid>.log."""
  host_runs = {m: _without_entry(r) for m, r in runs.items()}
  log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  cache_dir = jax.config.jax_compilation_cache_dir
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=min(suite.workers, len(keys)), mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(host_runs, log_dir, cache_dir)) as pool:
    futures = {pool.submit(_worker_row, key, suite): key for key in keys}
    bar.set_postfix_str(f"{len(keys)} rows in {suite.workers} worker processes, logs in {log_dir}")
    for future in concurrent.futures.as_completed(futures):
      row, images = future.result()
      if "error" in row:                  # the worker printed it into its log; say it here too
        print(f"row {' '.join(futures[future])} failed: {row['error']}")
      finish(futures[future], row, images)


def _without_entry(run: ModelRun) -> ModelRun:
  """The run to hand to a worker: the zoo entry is not picklable (a worker loads its own); the arrays pickle
  as they are (jax arrays come back as jax arrays: recipes index calibration data with traced indices)."""
  return dataclasses.replace(run, entry=None)


def _init_worker(host_runs: dict[str, ModelRun], log_dir: str, cache_dir: str | None):
  sys.stdout = sys.stderr = open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), "a", buffering=1)
  if cache_dir:
    from dqjax import compile_cache
    compile_cache.enable(cache_dir)
  _WORKER_RUNS.update(host_runs)


def _worker_row(key: tuple[str, str, str], suite: SuiteConfig):
  from dqjax import zoo
  model, method, setting = key
  run = _WORKER_RUNS[model]
  if run.entry is None:
    run = _WORKER_RUNS[model] = dataclasses.replace(run, entry=zoo.load(model))
  return _safe_row(run, method, setting, suite)
