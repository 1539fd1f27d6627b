r"""Error-analysis plots for a benchmark run: activation ranges over timesteps (why timestep-aware
quantization), per-step error trajectories, FP-vs-method image grids, per-layer sensitivity.

  python -m experiments.analyze --bench_dir=runs/quick --model=ldm-mnist --setting=W4A8 --out=runs/analysis
  python -m experiments.analyze --bench_dir=runs/quick --setting=W4A16 --step_error_methods=minmax,mse
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from absl import app, flags

from dqjax import compile_cache
from dqjax.analysis import errors
from dqjax.benchmark import runner
from dqjax.methods import recipe as recipe_lib
from dqjax.quant.spec import parse_bits

_BENCH = flags.DEFINE_string("bench_dir", "runs/quick", "a bench run directory (rows/ and samples/)")
_MODEL = flags.DEFINE_string("model", "ldm-mnist", "zoo model")
_SETTING = flags.DEFINE_string("setting", "W4A8", "bit setting for trajectories, grids and sensitivity")
_METHOD = flags.DEFINE_string("method", "minmax", "method whose calibrated model the sensitivity table uses")
_STEP_METHODS = flags.DEFINE_list("step_error_methods", [], "methods whose per-step ε error and shared-error "
                                  "share are tabulated side by side (e.g. minmax,mse)")
_SENSITIVITY = flags.DEFINE_bool("sensitivity", True, "write the per-layer sensitivity table (one forward per layer)")
_LAYERS = flags.DEFINE_integer("num_layers", 6, "layers shown in the activation-range plot")
_OUT = flags.DEFINE_string("out", "runs/analysis", "output directory")


def main(argv):
  del argv
  compile_cache.enable()
  from dqjax import zoo
  if _MODEL.value not in zoo.NAMES:
    raise app.UsageError(f"--model={_MODEL.value!r}; accepted values: {', '.join(zoo.NAMES)}")
  try:
    parse_bits(_SETTING.value)
  except ValueError as e:
    raise app.UsageError(f"--setting: {e}") from None
  for name in [_METHOD.value] + _STEP_METHODS.value:
    recipe_lib.get(name)                                  # clear error for an unknown method, before any work
  os.makedirs(_OUT.value, exist_ok=True)
  rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(_BENCH.value, "rows", "*.json")))]
  if not rows:
    raise app.UsageError(f"--bench_dir={_BENCH.value!r} has no rows; run experiments.bench first")
  model, setting = _MODEL.value, _SETTING.value.upper()
  outputs = [errors.plot_error_trajectories(rows, os.path.join(_OUT.value, f"{model}_{setting}_trajectory.png"),
                                            model=model, setting=setting)]
  images = {}
  finished = {(r["method"], r["setting"]) for r in rows if r["model"] == model and not r.get("error")}
  for path in sorted(glob.glob(os.path.join(_BENCH.value, "samples", f"{model}__*.npy"))):
    _, method, st = os.path.basename(path)[:-4].split("__")
    if st in ("FP", setting) and (method, st) in finished:    # samples left by a withdrawn row stay out
      images["FP" if st == "FP" else method] = np.load(path)
  if images:
    outputs.append(errors.comparison_grid(images, os.path.join(_OUT.value, f"{model}_{setting}_grid.png")))
  # Activation ranges and sensitivity need the model and its calibration data.
  suite = runner.SuiteConfig(models=(model,), methods=(_METHOD.value,), settings=(setting,), num_samples=8,
                             batch_size=8, calib_samples=16, calib_steps=20, calib_policy="all")
  entry = zoo.load(model)
  calib = runner.calibration_data(entry, suite, jax.random.key(0))
  w, a = parse_bits(setting)
  qm = runner.quantize_entry(entry, _METHOD.value, calib, w, a)
  if _STEP_METHODS.value:
    profiles = {name: errors.step_error_profile(
        qm if name == _METHOD.value else runner.quantize_entry(entry, name, calib, w, a), calib)
                for name in _STEP_METHODS.value}
    with open(os.path.join(_OUT.value, f"{model}_{setting}_step_errors.md"), "w") as f:
      f.write(f"# One-step ε error per timestep: {model}, {setting}\n\n{errors.step_error_table(profiles)}\n")
    outputs.append(f.name)
  ranges = errors.activation_ranges_over_time(qm, calib)
  if ranges:   # a weight-only setting (A16) observes no activation
    spread = sorted(ranges, key=lambda p: -float(np.ptp(ranges[p][2])))[:_LAYERS.value]
    outputs.append(errors.plot_activation_ranges({p: ranges[p] for p in spread},
                                                 os.path.join(_OUT.value, f"{model}_activation_ranges.png"),
                                                 title=f"{model}: layers whose input range drifts most over t"))
  if _SENSITIVITY.value:
    small = calib.select_steps(np.linspace(0, calib.num_steps - 1, 4).astype(int))
    table = errors.sensitivity_table(errors.layer_sensitivity(qm, small))
    with open(os.path.join(_OUT.value, f"{model}_{setting}_{_METHOD.value}_sensitivity.md"), "w") as f:
      f.write(f"# Per-layer sensitivity: {model}, {_METHOD.value} {setting}\n\n{table}\n")
    outputs.append(f.name)
  print("\n".join(outputs))


if __name__ == "__main__":
  app.run(main)
