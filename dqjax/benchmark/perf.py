"""Performance measurements of dqjax (DESIGN.md §5): the library half of `experiments/perf.py`.

Everything here is importable and testable without timing anything: the eager reference searches give
the same parameters as the compiled calibration (tests/test_perf.py checks it on a tiny model), the
ratio file and its regression check are plain JSON logic, and the report writer is a pure function of a
results dict. Timed runs live in `experiments/perf.py`.

Why the numbers are measured the way they are:
- the machine is shared, so every measurement records the 1-minute load average (what `uptime` shows)
  before and after, and both wall-clock and process CPU time. CPU time (all threads of this process) is
  much less sensitive to other processes than wall time; ratios are computed on it by default and the
  wall-clock ratios are reported beside them;
- comparisons are made back-to-back (the two sides of a ratio are timed in alternation) so that a load
  change hits both sides;
- compiled code is timed twice: "cold" (first call in the process: trace + compile + run, what a user
  pays once; the persistent compile cache is off) and "warm" (median of repeats after a warm-up).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dqjax import atomic

from dqjax.calib import calibrate, search
from dqjax.calib.data import CalibData
from dqjax.quant import ops as qops
from dqjax.quant.tables import TableSpec
from dqjax.transform import apply as qapply

REPORT_SECTIONS = ("Machine", "Calibration: compiled vs eager", "Reconstruction", "Sampling", "Memory",
                   "Scaling", "Sharding", "Optimisations", "Regression guard")


# --- machine and timing -------------------------------------------------------------------------------
def load_average() -> float:
  """The 1-minute load average (the first number `uptime` prints)."""
  try:
    return float(os.getloadavg()[0])
  except OSError:  # pragma: no cover - platforms without getloadavg
    return float("nan")


def machine_info() -> dict:
  """Platform, CPU count, JAX backend and devices, date and the load averages (1, 5, 15 min)."""
  try:
    loads = [round(v, 2) for v in os.getloadavg()]
  except OSError:  # pragma: no cover
    loads = []
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:  # pragma: no cover
    pass
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": len(jax.devices()), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "load_average": loads}


def block(x):
  """Wait for every array in a pytree (asynchronous dispatch would otherwise hide the work)."""
  for leaf in jax.tree_util.tree_leaves(x):
    if isinstance(leaf, jax.Array):
      leaf.block_until_ready()
  return x


@dataclasses.dataclass
class Timing:
  """Repeated measurements of one thing: wall and CPU seconds, load average at the start of each."""
  wall: list
  cpu: list
  load: list
  extrapolation: float = 1.0   # the measured work was 1/extrapolation of the whole (linear extrapolation)

  @property
  def median(self) -> float:
    return float(np.median(self.wall)) * self.extrapolation

  @property
  def cpu_median(self) -> float:
    return float(np.median(self.cpu)) * self.extrapolation

  @property
  def spread(self) -> tuple[float, float]:
    """(min, max) of the wall times (extrapolated like the median)."""
    return float(np.min(self.wall)) * self.extrapolation, float(np.max(self.wall)) * self.extrapolation

  def to_dict(self) -> dict:
    lo, hi = self.spread
    return {"wall_median": self.median, "wall_min": lo, "wall_max": hi, "cpu_median": self.cpu_median,
            "repeats": len(self.wall), "load": [round(v, 2) for v in self.load],
            "extrapolation": self.extrapolation}


def time_call(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
  """(result, wall s, CPU s, load before) of one call, waiting for its arrays."""
  load = load_average()
  w0, c0 = time.perf_counter(), time.process_time()
  out = block(fn())
  return out, time.perf_counter() - w0, time.process_time() - c0, load


def measure(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
  """Median-able timings of `fn()` after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  t = Timing([], [], [])
  for _ in range(max(1, repeats)):
    _, w, c, l = time_call(fn)
    t.wall.append(w)
    t.cpu.append(c)
    t.load.append(l)
  return t


def measure_pair(fa: Callable[[], Any], fb: Callable[[], Any], *, repeats: int = 3,
                 warmup: int = 1) -> tuple[Timing, Timing]:
  """Time two functions in alternation (a, b, a, b, ...) so that load changes hit both sides of a ratio."""
  for _ in range(warmup):
    block(fa())
    block(fb())
  ta, tb = Timing([], [], []), Timing([], [], [])
  for _ in range(max(1, repeats)):
    for f, t in ((fa, ta), (fb, tb)):
      _, w, c, l = time_call(f)
      t.wall.append(w)
      t.cpu.append(c)
      t.load.append(l)
  return ta, tb


def ratio(slow: Timing, fast: Timing, *, cpu: bool = True) -> float:
  """slow / fast on median CPU time (default) or wall time."""
  a, b = (slow.cpu_median, fast.cpu_median) if cpu else (slow.median, fast.median)
  return float(a / max(b, 1e-12))


# --- calibration problems -----------------------------------------------------------------------------
def zoo_calibration_data(entry, num_samples: int, num_steps: Optional[int], seed: int = 0) -> CalibData:
  """FP trajectories of `num_samples` noises → what the network sees at each step (CFG doubles the batch)
  → `num_steps` uniformly selected steps (None: all)."""
  from dqjax.calib.data import from_trajectory, select
  from dqjax.diffusion import samplers
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (num_samples,) + tuple(entry.sample_shape))
  conds, _ = entry.eval_conditioning(k2, num_samples)
  fn = jax.jit(lambda p, x, c, k: samplers.sample(
      entry.guided(lambda xx, t, cc: entry.model.apply({"params": p}, xx, t, cc)), entry.schedule,
      entry.sampler, x, k, c, return_trajectory=True))
  res = fn(entry.params, x, conds, k3)
  model_conds = entry.model_conditioning(conds)
  xs = res.trajectory.xs
  if model_conds is not None and jax.tree_util.tree_leaves(model_conds)[0].shape[0] != xs.shape[1]:
    xs = jnp.concatenate([xs, xs], axis=1)
  data = from_trajectory(xs, res.trajectory.ts, model_conds)
  if num_steps is None or num_steps >= data.num_steps:
    return data
  return select(data, "uniform", num_steps)


def zoo_qmodel(entry, w_bits: int = 8, a_bits: int = 8, **rule_kw):
  """An uncalibrated QModel of a zoo entry with the standard rules (per-channel weights, per-tensor acts)."""
  from dqjax.methods import common, recipe
  qm = recipe.prepare(entry.model, entry.params, common.standard_rules(w_bits, a_bits, **rule_kw),
                      entry.example_args(2), num_train_timesteps=entry.num_train_timesteps, warn_unused=False)
  return qm


def random_params(model, example_args, seed: int = 0):
  """Random parameters from shapes only (`eval_shape`: no compiled init), fan-in scaled, for timing."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *example_args)["params"]
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  key = jax.random.key(seed)
  out = []
  for i, (path, s) in enumerate(leaves):
    name = str(path[-1])
    if "scale" in name:
      out.append(jnp.ones(s.shape, s.dtype))
    elif "bias" in name or len(s.shape) < 2:
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      fan_in = int(np.prod(s.shape[:-1]))
      out.append(jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype) / math.sqrt(fan_in))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def width_unet(width: int, sample_size: int = 8, channels: int = 4):
  """A latent UNet2DModel (the ldm-mnist layout) with block widths (width, 2·width)."""
  from dqjax import models
  if width % 8:
    raise ValueError(f"width={width} must be a multiple of 8 (norm_num_groups=8)")
  cfg = dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
             block_out_channels=[width, 2 * width], layers_per_block=1,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
             attention_head_dim=16, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
             downsample_padding=1, time_embedding_type="positional")
  return models.UNet2DModel(models.UNet2DConfig.from_dict(cfg))


def synthetic_problem(model, params, sample_shape, *, num_samples: int, num_steps: int, seed: int = 0,
                      w_bits: int = 8, a_bits: int = 8):
  """(QModel, CalibData) of a model on random inputs at `num_steps` evenly spaced timesteps (for scaling
  measurements, where only the amount of work matters)."""
  from dqjax.methods import common, recipe
  x = jnp.zeros((2,) + tuple(sample_shape))
  qm = recipe.prepare(model, params, common.standard_rules(w_bits, a_bits), (x, jnp.full((2,), 500.0), None),
                      warn_unused=False)
  xs = jax.random.normal(jax.random.key(seed), (num_steps, num_samples) + tuple(sample_shape))
  ts = jnp.round(jnp.linspace(999, 0, num_steps)).astype(jnp.float32)
  return qm, CalibData(xs, ts, None, jnp.arange(num_steps))


# --- the compiled calibration ------------------------------------------------------------------------
def jitted_calibration(qm, data: CalibData, *, num_candidates: int = 100, p_act: float = 2.4,
                       p_weight: float = 2.0, table: TableSpec = TableSpec("per_step"),
                       batch_size: Optional[int] = None, error_estimate: str = "exact"):
  """The calibration being benchmarked: MSE weights, then MSE (Lp) activation tables.

  The activation errors are the exact per-candidate sums by default — the algorithm the eager reference
  runs, so the speed-up measures compilation alone; `error_estimate='hist'` (the library default) is
  faster still (see `calibrate.calibrate_activations`)."""
  qm = calibrate.calibrate_weights(qm, "mse", num_candidates=num_candidates, p=p_weight)
  return calibrate.calibrate_activations(qm, data, "mse", table=table, batch_size=batch_size,
                                         num_candidates=num_candidates, p=p_act, error_estimate=error_estimate)


# --- the eager reference: what the PyTorch repos do, op by op -----------------------------------------------
@dataclasses.dataclass
class EagerResult:
  """Ranges found by an eager search, the work done and its timing.

  ranges: {key: (lo [k], hi [k])} for the rows searched (weights: key = op path or path + ':split', rows
  = the first k channels; activations: key = (step, op path, operand), rows = all rows).
  fraction: share of the full work that was timed (the time is extrapolated by 1/fraction).
  """
  ranges: dict
  wall: float
  cpu: float
  load: float
  fraction: float
  units_done: int
  units_total: int

  def timing(self) -> Timing:
    return Timing([self.wall], [self.cpu], [self.load], extrapolation=1.0 / max(self.fraction, 1e-12))


def _eager_row_search(row, spec, num_candidates: int, p: float, ratios) -> tuple[jax.Array, jax.Array]:
  """One row, one candidate at a time, keeping the best (the loop of Q-Diffusion's / BRECQ's quantizer init)."""
  lo, hi = search.base_range(row, spec)
  best_err, best_r = float("inf"), None
  for i in range(num_candidates):
    err = float(search.row_error(row, lo * ratios[i], hi * ratios[i], spec, p)[0])
    if err < best_err:   # first minimum wins, like argmin
      best_err, best_r = err, ratios[i]
  return lo * best_r, hi * best_r


def _eager_context(disable_jit: bool):
  return jax.disable_jit() if disable_jit else contextlib.nullcontext()


def eager_weight_search(qm, *, num_candidates: int = 100, p: float = 2.0, channel_fraction: float = 1.0,
                        disable_jit: bool = True) -> EagerResult:
  """Per layer, per output channel, per candidate: the MSE shrink-grid weight search in eager mode.

  Only the first ceil(channel_fraction·R) channels of every layer are searched; the time is extrapolated
  linearly to all channels (the per-channel work is identical)."""
  ratios = search.shrink_ratios(num_candidates)
  ratios = [ratios[i] for i in range(num_candidates)]
  ranges, done, total = {}, 0, 0
  load = load_average()
  w0, c0 = time.perf_counter(), time.process_time()
  with _eager_context(disable_jit):
    for op in qm.plan.ops:
      if op.weight is None:
        continue
      st = qm.qstate.get(op.path)
      kernel = qapply.get_kernel(qm.params, op.path)
      if st is not None:
        kernel = qapply.effective_kernel(kernel, st)
      parts = [(op.path, kernel)]
      if op.input_split:
        c = op.input_split
        parts = [(op.path, kernel[..., :c, :]), (op.path + ":split", kernel[..., c:, :])]
      for key, k in parts:
        wg = qops.group_view(k, op.weight)
        rows = search.to_rows(wg, qops.weight_reduce_axes(op.weight, wg.ndim))
        n = int(rows.shape[0])
        todo = max(1, int(math.ceil(channel_fraction * n)))
        los, his = [], []
        for j in range(todo):
          lo, hi = _eager_row_search(rows[j:j + 1], op.weight, num_candidates, p, ratios)
          los.append(lo)
          his.append(hi)
        ranges[key] = (jnp.concatenate(los), jnp.concatenate(his))
        done += todo
        total += n
  block(ranges)
  return EagerResult(ranges, time.perf_counter() - w0, time.process_time() - c0, load, done / total, done,
                     total)


def _capture_stat_fn(plan):
  ops_ = {op.path: op for op in plan.ops}

  def stat_fn(op, operand, x):
    op = ops_[op.path]
    out = {}
    for name, spec in calibrate._operands(op):
      if name not in (operand, "input_split" if operand == "input" else None):
        continue
      rows, _, _ = calibrate._rows_of(calibrate._split_view(op, name, x).astype(jnp.float32), spec)
      out[name] = rows
    return out or None

  return stat_fn


def eager_activation_search(qm, data: CalibData, *, num_candidates: int = 100, p: float = 2.4,
                            num_steps: Optional[int] = None, batch_size: Optional[int] = None,
                            disable_jit: bool = True) -> EagerResult:
  """Per step, per batch: run the model eagerly and capture every layer's inputs; then per layer and
  per row (channel), per candidate: the Lp shrink-grid search in eager mode ('per_step' tables).

  Only the first `num_steps` steps are done (None: all); the time is extrapolated linearly to all steps.
  """
  data = data.validate()
  s_total, n = data.num_steps, data.num_samples
  bs = batch_size or n
  if n % bs:
    raise ValueError(f"batch_size={bs} must divide the calibration samples per step ({n})")
  steps = s_total if num_steps is None else max(1, min(num_steps, s_total))
  ratios = search.shrink_ratios(num_candidates)
  ratios = [ratios[i] for i in range(num_candidates)]
  stat_fn = _capture_stat_fn(qm.plan)
  concat = lambda a, b: jnp.concatenate([a, b], axis=1)   # an op called twice in one forward
  ranges = {}
  load = load_average()
  w0, c0 = time.perf_counter(), time.process_time()
  with _eager_context(disable_jit):
    for s in range(steps):
      captured: dict = {}
      for b0 in range(0, n, bs):
        x = data.xs[s, b0:b0 + bs]
        t = jnp.full((bs,), jnp.asarray(data.ts)[s], jnp.float32)
        c = None if data.conds is None else jax.tree_util.tree_map(lambda a: a[s, b0:b0 + bs], data.conds)
        stats = qapply.observe(qm.model, qm.plan, qm.params, {}, stat_fn, x, t, c, t=t, stat_reduce=concat)
        for path, by in stats.items():
          for name, rows in by.items():
            captured.setdefault((path, name), []).append(rows)
      for (path, name), chunks in captured.items():
        rows = jnp.concatenate(chunks, axis=1)
        spec = calibrate._spec_of(qm.plan[path], name)
        los, his = [], []
        for j in range(int(rows.shape[0])):
          lo, hi = _eager_row_search(rows[j:j + 1], spec, num_candidates, p, ratios)
          los.append(lo)
          his.append(hi)
        ranges[(s, path, name)] = (jnp.concatenate(los), jnp.concatenate(his))
  block(ranges)
  return EagerResult(ranges, time.perf_counter() - w0, time.process_time() - c0, load, steps / s_total, steps,
                     s_total)


def compare_weight_ranges(qm_cal, eager: EagerResult) -> dict:
  """Agreement of the eager weight ranges with the compiled calibration's parameters (same rows)."""
  diffs, equal, count = [], 0, 0
  for op in qm_cal.plan.ops:
    if op.weight is None:
      continue
    st = qm_cal.qstate[op.path]
    for key, qp in ((op.path, st.weight), (op.path + ":split", st.weight_split)):
      if key not in eager.ranges:
        continue
      lo, hi = eager.ranges[key]
      k = lo.shape[0]
      # keepdims parameters flatten in `search.to_rows` order (kept axes, row-major)
      ref = np.asarray(qp.scale).reshape(-1)[:k]
      got = np.asarray(search.params_for((lo, hi), op.weight).scale).reshape(-1)
      d = np.abs(np.asarray(got) - np.asarray(ref)) / np.maximum(np.abs(np.asarray(ref)), 1e-12)
      diffs.append(float(d.max()))
      equal += int(np.sum(d <= 1e-6))
      count += int(d.size)
  return {"max_rel_diff": max(diffs) if diffs else 0.0, "fraction_equal": equal / max(count, 1),
          "count": count}


def compare_activation_ranges(qm_cal, eager: EagerResult) -> dict:
  """Agreement of eager per-step activation ranges with the compiled per-step tables (scale and zero point)."""
  diffs, equal, count = [], 0, 0
  for (s, path, name), (lo, hi) in eager.ranges.items():
    op = qm_cal.plan[path]
    spec = calibrate._spec_of(op, name)
    act = qm_cal.qstate[path].acts[name]
    ref = act.qp if act.qp.scale.shape[0] == 1 else jax.tree_util.tree_map(lambda a: a[s:s + 1], act.qp)
    got = search.params_for((lo, hi), spec)
    for r, g in ((ref.scale, got.scale), (ref.zero_point, got.zero_point)):
      if r is None or g is None:
        continue
      r, g = np.asarray(r).reshape(-1), np.asarray(g).reshape(-1)
      d = np.abs(g - r) / np.maximum(np.abs(r), 1e-6)
      diffs.append(float(d.max()))
      equal += int(np.sum(d <= 1e-6))
      count += int(d.size)
  return {"max_rel_diff": max(diffs) if diffs else 0.0, "fraction_equal": equal / max(count, 1),
          "count": count}


# --- reconstruction -------------------------------------------------------------------------------------------
def reconstruction_rate(qm, data: CalibData, *, iters: int, batch_size: int = 32, num_blocks: int = 2,
                        phase: str = "weights", num_samples: Optional[int] = None) -> dict:
  """BRECQ/AdaRound iterations per second on the first `num_blocks` blocks: a warm-up run compiles, the
  timed run reuses the compiled steps (the time includes the blocks' input capture)."""
  from dqjax.calib import reconstruct as rec
  blocks = rec.partition(qm.plan)[:num_blocks]
  cfg = rec.ReconConfig(iters=iters, batch_size=batch_size, progress=False, num_samples=num_samples,
                        chunk=min(50, iters))
  run = lambda: rec.reconstruct(qm, data, blocks, cfg, phase=phase).qstate
  _, w_cold, c_cold, _ = time_call(run)
  t = measure(run, repeats=1, warmup=0)
  total = iters * len(blocks)
  return {"blocks": len(blocks), "iters_per_block": iters, "batch_size": batch_size,
          "cold_s": w_cold, "cold_cpu_s": c_cold, "warm": t.to_dict(),
          "its_per_s": total / max(t.median, 1e-12), "its_per_cpu_s": total / max(t.cpu_median, 1e-12)}


# --- sampling -----------------------------------------------------------------------------------------------
SAMPLING_MODES = ("fp", "sim-W8A8", "sim-W4A8", "deploy-int8", "deploy-int4", "deploy-fp8")


def mode_setting(mode: str) -> tuple[Optional[int], Optional[int], str]:
  """(w_bits, a_bits, weight_format) of a sampling mode."""
  if mode not in SAMPLING_MODES:
    raise ValueError(f"sampling mode {mode!r} is unknown; accepted values: {', '.join(SAMPLING_MODES)}")
  return {"fp": (None, None, "int"), "sim-W8A8": (8, 8, "int"), "sim-W4A8": (4, 8, "int"),
          "deploy-int8": (8, 8, "int"), "deploy-int4": (4, 8, "int"),
          "deploy-fp8": (8, 8, "fp8_e4m3")}[mode]


def calibrated_for_mode(entry, mode: str, data: CalibData):
  """A min-max-calibrated QModel for a sampling mode (None for 'fp'): the cheapest complete state."""
  w_bits, a_bits, fmt = mode_setting(mode)
  if w_bits is None:
    return None
  qm = zoo_qmodel(entry, w_bits, a_bits, weight_format=fmt)
  qm = calibrate.calibrate_weights(qm, "minmax")
  return calibrate.calibrate_activations(qm, data, "minmax")


def sampler_for_mode(entry, qm, mode: str) -> tuple[Callable, tuple]:
  """(f(state, x, cond, key) -> x0, state): the whole sampler as one function of explicit arrays (the
  parameters are arguments, not constants baked into the program)."""
  from dqjax.diffusion import samplers
  model = entry.model

  def run(denoise, x, c, k):
    return samplers.sample(entry.guided(denoise), entry.schedule, entry.sampler, x, k, c).x0

  if mode == "fp":
    return (lambda st, x, c, k: run(lambda xx, t, cc: model.apply({"params": st}, xx, t, cc), x, c, k),
            entry.params)
  if mode.startswith("sim"):
    f = lambda st, x, c, k: run(qapply.denoiser(model, qm.plan, st[0], st[1], mode="simulate"), x, c, k)
    return f, (qm.params, qm.qstate)
  from dqjax import deploy
  stripped, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
  f = lambda st, x, c, k: run(qapply.denoiser(model, qm.plan, st[0], st[1]["qstate"], mode="deploy",
                                              deployed=st[1]), x, c, k)
  return f, (stripped, deployed)


def compile_timed(f: Callable, *args) -> tuple[Any, dict]:
  """(compiled, {'trace_lower_s', 'compile_s', 'memory'}) via the AOT API."""
  jf = jax.jit(f)
  w0 = time.perf_counter()
  lowered = jf.lower(*args)
  w1 = time.perf_counter()
  compiled = lowered.compile()
  w2 = time.perf_counter()
  return compiled, {"trace_lower_s": w1 - w0, "compile_s": w2 - w1, "memory": memory_of(compiled)}


def memory_of(compiled) -> Optional[dict]:
  """XLA's memory analysis of a compiled program (bytes), where the backend provides it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backends without the analysis raise various errors
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}
  if out:
    out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                                  + out.get("temp_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0))
  return out


def weight_bytes(qm) -> dict:
  """Weight storage of the quantized ops: fp32 bytes, code bytes, scale bytes and the ratios."""
  from dqjax import deploy
  _, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
  b = deploy.kernel_bytes(qm.plan, qm.fp_params, deployed)
  b["codes_ratio"] = b["fp32"] / max(b["codes"], 1)
  b["total_ratio"] = b["fp32"] / max(b["codes"] + b["scales"], 1)
  b["scale_share"] = b["scales"] / max(b["codes"] + b["scales"], 1)
  return b


# --- scaling --------------------------------------------------------------------------------------------------
def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
  """Least-squares y = a + b·x with R², and the exponent of a log-log fit (1 = linear scaling)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  b, a = np.polyfit(x, y, 1)
  pred = a + b * x
  ss = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else 1.0
  ok = (x > 0) & (y > 0)
  exponent = float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
  return {"intercept": float(a), "slope": float(b), "r2": r2, "loglog_exponent": exponent}


# --- ratios and the regression guard ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ratio:
  """A dimensionless result: `better` is 'higher' (speed-ups, compression) or 'lower' (overheads)."""
  value: float
  better: str
  note: str = ""

  def __post_init__(self):
    if self.better not in ("higher", "lower"):
      raise ValueError(f"Ratio.better={self.better!r} is unknown; accepted values: higher, lower")


def save_ratios(path: str, ratios: dict, meta: Optional[dict] = None) -> None:
  obj = {"meta": meta or {}, "ratios": {k: dataclasses.asdict(r) for k, r in sorted(ratios.items())}}
  atomic.write_json(path, obj)


def load_ratios(path: str) -> tuple[dict, dict]:
  with open(path) as f:
    obj = json.load(f)
  if "ratios" not in obj:
    raise ValueError(f"{path}: not a ratio file (no 'ratios' key)")
  return {k: Ratio(**v) for k, v in obj["ratios"].items()}, obj.get("meta", {})


def check_ratios(current: dict, committed: dict, tolerance: float = 0.3) -> list[str]:
  """Regressions of `current` against `committed` ratios: a 'higher' ratio below committed·(1 − tol), or a
  'lower' ratio above committed·(1 + tol). Ratios present on one side only are ignored. Returns messages."""
  if not 0 <= tolerance < 1:
    raise ValueError(f"tolerance={tolerance!r} is out of range; accepted: 0 <= tolerance < 1")
  out = []
  for name, ref in sorted(committed.items()):
    cur = current.get(name)
    if cur is None or not np.isfinite(ref.value) or not np.isfinite(cur.value):
      continue
    if ref.better == "higher" and cur.value < ref.value * (1 - tolerance):
      out.append(f"{name}: {cur.value:.3g} < committed {ref.value:.3g} − {tolerance:.0%} (higher is better)")
    if ref.better == "lower" and cur.value > ref.value * (1 + tolerance):
      out.append(f"{name}: {cur.value:.3g} > committed {ref.value:.3g} + {tolerance:.0%} (lower is better)")
  return out


# --- the report -------------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
  if v is None:
    return "–"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, float) and not np.isfinite(v):
    return str(v)
  return f"{v:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in r) + " |")
  return "\n".join(lines)


def _timing_cell(t: Optional[dict]) -> str:
  if not t:
    return "–"
  s = f"{_fmt(t['wall_median'])} [{_fmt(t['wall_min'])}–{_fmt(t['wall_max'])}]"
  if t.get("extrapolation", 1.0) != 1.0:
    s += f" (×{_fmt(t['extrapolation'])} extrap.)"
  return s


def _load_cell(t: Optional[dict]) -> str:
  return "–" if not t else "/".join(_fmt(v, 2) for v in t.get("load", []))


def write_report(results: dict, out_dir: str, *, plots: bool = True, md_path: Optional[str] = None) -> str:
  """Write `perf.md` (and PNG plots under `<out_dir>/perf/`) from a results dict; returns the md path.

  Missing parts of `results` give a section saying they were not run, so the section list is stable.
  """
  md_path = md_path or os.path.join(out_dir, "perf.md")
  plot_dir = os.path.join(out_dir, "perf")
  os.makedirs(plot_dir, exist_ok=True)
  m = results.get("machine", {})
  parts = [f"# dqjax performance\n\nGenerated by `python -m experiments.perf --config={results.get('config', '?')}`"
           f" on {m.get('date', '?')}; total wall time {_fmt(results.get('wall_s'))} s. All times in seconds: "
           "median [min–max] wall clock of the repeats; *CPU* = process CPU time (all threads), which other "
           "processes on this shared machine disturb much less than wall time. *Load* = the 1-minute load "
           "average (`uptime`) when each repeat started. Ratios use CPU time unless marked *wall*."]
  for note in results.get("notes", []):
    parts.append(f"> {note}")
  parts.append("## Machine\n\n" + _table(["field", "value"], [[k, str(v)] for k, v in m.items()]))
  figs = []
  # calibration
  cal = results.get("calibration", {})
  if cal:
    rows = []
    for name, r in cal.items():
      rows.append([name, _timing_cell(r["jit_cold"]), _timing_cell(r["jit_warm"]), _timing_cell(r["eager"]),
                   _fmt(r["speedup_cold"]), _fmt(r["speedup_warm"]), _fmt(r["speedup_cold_wall"]),
                   _load_cell(r["jit_warm"]) + " ; " + _load_cell(r["eager"])])
    text = ("Compiled: `calibrate_weights(qm, 'mse')` + `calibrate_activations(qm, data, 'mse', "
            "table=TableSpec('per_step'))` (all layers × timesteps, 100 candidates, p=2 weights / 2.4 acts). "
            "Eager: the same searches as the PyTorch references write them — per step and batch the model runs "
            "eagerly under `jax.disable_jit()` capturing each layer's input, then per layer, per channel and per "
            "candidate the Lp error is computed and the best kept — timed on a fixed fraction of the work and "
            "extrapolated linearly (fraction shown). *cold* = first call (trace + compile + run), *warm* = "
            "repeat call. Goal: ≥ 10×.\n\n")
    text += _table(["model", "compiled cold s", "compiled warm s", "eager s", "speed-up cold (CPU)",
                    "speed-up warm (CPU)", "speed-up cold (wall)", "load jit ; eager"], rows)
    agree = [[name, r.get("eager_fraction_w"), r.get("eager_fraction_a"),
              _fmt(r["agree_weights"]["max_rel_diff"]), _fmt(r["agree_weights"]["fraction_equal"]),
              _fmt(r["agree_acts"]["max_rel_diff"]), _fmt(r["agree_acts"]["fraction_equal"])]
             for name, r in cal.items()]
    text += ("\n\nSame parameters? (relative difference of scales / zero points of the rows the eager search "
             "did; argmin near-ties may flip when float sums are ordered differently)\n\n")
    text += _table(["model", "eager weight fraction", "eager act fraction", "weights max rel diff",
                    "weights equal", "acts max rel diff", "acts equal"], agree)
    extra = [[name, _timing_cell(r.get("jit_weights")), _timing_cell(r.get("jit_acts")),
              _timing_cell(r.get("eager_weights")), _timing_cell(r.get("eager_acts"))] for name, r in cal.items()]
    text += "\n\nParts (compiled warm / eager extrapolated):\n\n" + _table(
        ["model", "compiled weights", "compiled acts", "eager weights", "eager acts"], extra)
    if plots:
      figs.append(_bar_plot(os.path.join(plot_dir, "calibration.png"), list(cal),
                            {"compiled (cold)": [r["jit_cold"]["cpu_median"] for r in cal.values()],
                             "compiled (warm)": [r["jit_warm"]["cpu_median"] for r in cal.values()],
                             "eager": [r["eager"]["cpu_median"] for r in cal.values()]},
                            "CPU seconds (log)", "Calibration: compiled vs eager", log=True))
      text += "\n\n![calibration](perf/calibration.png)"
    parts.append("## Calibration: compiled vs eager\n\n" + text)
  else:
    parts.append("## Calibration: compiled vs eager\n\nNot run.")
  rec = results.get("reconstruction", {})
  if rec:
    rows = [[name, r["phase"], r["blocks"], r["iters_per_block"], r["batch_size"], _fmt(r["cold_s"]),
             _timing_cell(r["warm"]), _fmt(r["its_per_s"]), _fmt(r["its_per_cpu_s"]), _load_cell(r["warm"])]
            for name, r in rec.items()]
    parts.append("## Reconstruction\n\n`dqjax.calib.reconstruct.reconstruct` (BRECQ blocks, AdaRound V for "
                 "'weights', LSQ act scales for 'acts') on the first blocks; a first run compiles, the "
                 "timed run reuses the compiled steps and includes the blocks' input capture.\n\n"
                 + _table(["model", "phase", "blocks", "iters/block", "batch", "cold s", "warm s", "it/s (wall)",
                           "it/CPU-s", "load"], rows))
  else:
    parts.append("## Reconstruction\n\nNot run.")
  smp = results.get("sampling", {})
  if smp:
    rows = []
    for name, by in smp.items():
      for mode, r in by.items():
        rows.append([name, mode, _fmt(r["trace_lower_s"]), _fmt(r["compile_s"]), _timing_cell(r["run"]),
                     _fmt(r["run"]["cpu_median"]), _fmt(r.get("over_fp")), _fmt(r.get("over_fp_wall")),
                     _load_cell(r["run"])])
    parts.append("## Sampling\n\nThe zoo sampler (`dqjax.diffusion.samplers.sample`, its card's steps and "
                 "guidance) compiled once with the parameters as arguments; FP vs simulated (fake-quant) and "
                 "deploy-mode (int8 codes with int8×int8→int32 dots/convs, packed int4, fp8 codes) at "
                 f"batch {results.get('sampling_batch', '?')}. Modes of one model are timed in alternation. "
                 "Goals: simulated W8A8 ≤ 1.3× FP; compile ≤ 30 s.\n\n"
                 + _table(["model", "mode", "trace+lower s", "compile s", "run s (wall)", "run CPU s",
                           "× FP (CPU)", "× FP (wall)", "load"], rows))
    if plots:
      names = list(smp)
      modes = [mm for mm in SAMPLING_MODES if any(mm in smp[n] for n in names)]
      figs.append(_bar_plot(os.path.join(plot_dir, "sampling.png"), names,
                            {mm: [smp[n].get(mm, {}).get("over_fp", float("nan")) for n in names] for mm in modes},
                            "time / FP time (CPU)", "Sampling time relative to FP", hline=1.3))
      parts[-1] += "\n\n![sampling](perf/sampling.png)"
  else:
    parts.append("## Sampling\n\nNot run.")
  mem = results.get("memory", {})
  if mem:
    rows = []
    for name, by in mem.items():
      for mode, r in by.items():
        pk = (r.get("peak") or {}).get("peak_estimate_bytes")
        rows.append([name, mode, r.get("fp32"), r.get("codes"), r.get("scales"), _fmt(r.get("codes_ratio")),
                     _fmt(r.get("total_ratio")), _fmt(100 * r["scale_share"]) + " %" if "scale_share" in r else "–",
                     _fmt(pk / 2 ** 20) if pk else "–"])
    parts.append("## Memory\n\nWeight bytes of the quantized ops (`dqjax.deploy.kernel_bytes`): fp32, stored "
                 "codes, scales; goal 4× (int8) and 8× (packed int4) on codes, scales < 3 %. Peak: XLA's "
                 "`memory_analysis()` of the compiled sampler (arguments + outputs + temporaries).\n\n"
                 + _table(["model", "mode", "fp32 B", "codes B", "scales B", "fp32/codes", "fp32/(codes+scales)",
                           "scale share", "sampler peak MiB"], rows))
  else:
    parts.append("## Memory\n\nNot run.")
  sc = results.get("scaling", {})
  if sc:
    text = ("Compiled calibration (weights + per-step MSE activations, cold call: what a user pays) vs "
            "the number of calibration samples per step and vs UNet width (block widths w, 2w; random "
            "parameters). A log-log exponent of 1 is linear scaling.\n\n")
    for key, label in (("samples", "samples per step"), ("width", "width w")):
      if key not in sc:
        continue
      d = sc[key]
      rows = [[x, _fmt(c), _fmt(w), _fmt(l, 2)] for x, c, w, l in zip(d["x"], d["cpu"], d["wall"], d["load"])]
      fit = d.get("fit_cpu", {})
      text += (f"\n\n**vs {label}** ({d.get('what', '')}): CPU-time fit slope {_fmt(fit.get('slope'))} s per "
               f"unit, R² {_fmt(fit.get('r2'))}, log-log exponent {_fmt(fit.get('loglog_exponent'))}.\n\n"
               + _table([label, "CPU s", "wall s", "load"], rows))
      if plots:
        figs.append(_line_plot(os.path.join(plot_dir, f"scaling_{key}.png"), d["x"], d["cpu"], d["wall"], label,
                               f"Calibration time vs {label}"))
        text += f"\n\n![scaling {key}](perf/scaling_{key}.png)"
    parts.append("## Scaling\n\n" + text)
  else:
    parts.append("## Scaling\n\nNot run.")
  sh = results.get("sharding")
  if sh:
    rows = [[k, _fmt(v) if not isinstance(v, (str, bool)) else str(v)] for k, v in sh.items() if not isinstance(v, dict)]
    parts.append("## Sharding\n\nIn a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`: "
                 "calibration data and sampler noise sharded over the batch axis of a `('data',)` mesh vs one "
                 "device, same inputs. (The 8 fake devices share the machine's cores: this checks correctness "
                 "of the sharded code paths and reports throughput; it cannot show a speed-up.)\n\n"
                 + _table(["quantity", "value"], rows))
  else:
    parts.append("## Sharding\n\nNot run.")
  opt = results.get("optimisations", [])
  parts.append("## Optimisations\n\n" + ("\n".join(f"- {o}" for o in opt) if opt else "None recorded."))
  rat = results.get("ratios", {})
  rows = [[k, _fmt(v.value if isinstance(v, Ratio) else v["value"]),
           (v.better if isinstance(v, Ratio) else v["better"]), (v.note if isinstance(v, Ratio) else v.get("note", ""))]
          for k, v in sorted(rat.items())]
  parts.append("## Regression guard\n\n`python -m experiments.perf --check` (by hand, not in CI) re-measures "
               "these ratios with the same config and exits non-zero when one is worse than the committed value "
               f"by more than the tolerance ({results.get('tolerance', 0.3):.0%}); ratios are stored in "
               "`docs/results/perf/ratios.json`.\n\n" + (_table(["ratio", "value", "better", "note"], rows)
                                                          if rows else "No ratios."))
  with open(md_path, "w") as f:
    f.write("\n\n".join(parts) + "\n")
  return md_path


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _bar_plot(path, groups, series: dict, ylabel, title, *, log=False, hline=None):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(groups) + 2), 3.2))
  width = 0.8 / max(len(series), 1)
  for i, (label, vals) in enumerate(series.items()):
    ax.bar(np.arange(len(groups)) + i * width, vals, width, label=label)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
  ax.set_xticklabels(groups, fontsize=8)
  if log:
    ax.set_yscale("log")
  if hline is not None:
    ax.axhline(hline, color="k", ls="--", lw=0.8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _line_plot(path, x, cpu, wall, xlabel, title):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.2, 3.2))
  ax.plot(x, cpu, "o-", label="CPU s")
  ax.plot(x, wall, "s--", label="wall s")
  fit = np.polyfit(np.asarray(x, float), np.asarray(cpu, float), 1)
  xx = np.linspace(0, max(x), 20)
  ax.plot(xx, fit[1] + fit[0] * xx, "k:", lw=0.8, label="linear fit (CPU)")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("seconds")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def check_against(ratios: dict, path: str, tolerance: float) -> int:
  """0 if no ratio regressed against the file at `path`, else 1 (messages are printed): the exit code of
  `python -m experiments.perf --check`."""
  committed, meta = load_ratios(path)
  bad = check_ratios(ratios, committed, tolerance)
  shared = sorted(set(ratios) & set(committed))
  print(f"checked {len(shared)} ratios against {path} (committed {meta.get('date', '?')}, config "
        f"{meta.get('config', '?')}; tolerance {tolerance:.0%})")
  for name in shared:
    print(f"  {name}: now {ratios[name].value:.3g}, committed {committed[name].value:.3g} "
          f"({committed[name].better} is better)")
  for msg in bad:
    print("REGRESSION " + msg)
  return 1 if bad else 0
