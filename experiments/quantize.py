r"""Quantize one zoo model with one method at one bit setting: checkpoint + metrics in a run directory.

  python -m experiments.quantize --model=ldm-mnist --method=mse --setting=W4A8 --workdir=runs/q/ldm_mse_w4a8
  python -m experiments.quantize --model=dit-mnist --method=minmax --setting=W8A8 --num_samples=256 \
      --workdir=runs/q/dit

A rerun with the same workdir reuses the saved checkpoint (quantization is not repeated) when it was made
for the same model, method and setting; otherwise it is quantized again and replaced.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from dqjax import atomic, checkpoint, compile_cache, metrics, zoo
from dqjax.benchmark import costs, report, runner
from dqjax.methods import recipe as recipe_lib
from dqjax.quant.spec import parse_bits

_MODEL = flags.DEFINE_string("model", "ldm-mnist", "zoo model")
_METHOD = flags.DEFINE_string("method", "minmax", "registered method")
_SETTING = flags.DEFINE_string("setting", "W8A8", "bit setting W<bits>A<bits>")
_SAMPLES = flags.DEFINE_integer("num_samples", 256, "evaluation samples")
_CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", 64, "calibration samples per selected step")
_CALIB_STEPS = flags.DEFINE_integer("calib_steps", 10, "selected steps of the FP trajectory")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/quantize/<model>_<method>_<setting>)")


def _checked_flags():
  """(method entry, (w_bits, a_bits)); every bad flag is named in one UsageError, so that one rerun fixes all."""
  errors, entry_method, bits = [], None, None
  if _MODEL.value not in zoo.NAMES:
    errors.append(f"--model={_MODEL.value!r}; accepted values: {', '.join(zoo.NAMES)}")
  try:
    entry_method = recipe_lib.get(_METHOD.value)
  except ValueError as e:
    errors.append(f"--method: {e}")
  try:
    bits = parse_bits(_SETTING.value)
  except ValueError as e:
    errors.append(f"--setting: {e}")
  if _SAMPLES.value <= 0:
    errors.append(f"--num_samples={_SAMPLES.value} must be positive")
  if errors:
    raise app.UsageError("\n".join(errors))
  return entry_method, bits


def main(argv):
  del argv
  entry_method, (w_bits, a_bits) = _checked_flags()
  compile_cache.enable()
  workdir = _WORKDIR.value or os.path.join("runs", "quantize", f"{_MODEL.value}_{_METHOD.value}_{_SETTING.value}")
  os.makedirs(workdir, exist_ok=True)
  config = {"model": _MODEL.value, "method": _METHOD.value, "family": entry_method.family,
            "setting": _SETTING.value.upper(), "num_samples": _SAMPLES.value, "calib_samples": _CALIB_SAMPLES.value,
            "calib_steps": _CALIB_STEPS.value, "seed": _SEED.value,
            "method_config": None}
  mcfg = runner.method_config(_METHOD.value)
  if mcfg is not None:
    config["method_config"] = json.loads(mcfg.to_json_best_effort())
  atomic.write_json(os.path.join(workdir, "config.json"), config)

  suite = runner.SuiteConfig(models=(_MODEL.value,), methods=(_METHOD.value,), settings=(_SETTING.value.upper(),),
                             num_samples=_SAMPLES.value, batch_size=min(_SAMPLES.value, 250),
                             calib_samples=_CALIB_SAMPLES.value, calib_steps=_CALIB_STEPS.value, seed=_SEED.value)
  run = runner.prepare_model(_MODEL.value, suite)
  entry = run.entry
  ckpt = os.path.join(workdir, "checkpoint")
  start = time.perf_counter()
  qm = None
  if os.path.isdir(ckpt):
    qm = runner.restore_quantized(ckpt, entry, {"model": _MODEL.value, "method": _METHOD.value,
                                                "setting": _SETTING.value.upper()})
  if qm is None:
    qm = runner.quantize_entry(entry, _METHOD.value, run.calib, w_bits, a_bits, mcfg)
    checkpoint.save(ckpt, qm.plan, qm.params, qm.qstate,
                    corrections={c.name: c.state for c in qm.corrections},
                    metadata={"model": _MODEL.value, "method": _METHOD.value, "setting": _SETTING.value.upper(),
                              "forward": recipe_lib.forward_kind(qm), "hi_act_bits": qm.meta.get("hi_act_bits")})
  quant_seconds = time.perf_counter() - start
  images, traj = runner.sample_images(entry, qm.denoiser(), run.noise, run.conds, jax.random.key(_SEED.value + 1),
                                      correction=qm.correction, batch_size=suite.batch_size, trajectory=True)
  scores = {k: float(v) for k, v in metrics.evaluate_samples(images, run.labels).items()}
  scores.update(psnr=float(metrics.psnr(images, run.fp_images)), ssim=float(metrics.ssim(images, run.fp_images)),
                quant_seconds=quant_seconds, **costs.row_costs(entry, qm.plan))
  scores["traj_mse"] = [float(v) for v in np.asarray(metrics.trajectory_mse(traj.xs, run.fp_traj.xs))]
  atomic.write_json(os.path.join(workdir, "metrics.json"), scores)
  row = {"model": _MODEL.value, "method": _METHOD.value, "setting": _SETTING.value.upper(), **scores,
         "num_samples": _SAMPLES.value}
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(report.markdown_table([row]))
  with open(os.path.join(workdir, "table.csv"), "w") as f:
    f.write(report.csv_table([row]))
  report.save_grid(images[:64], os.path.join(workdir, "samples.png"))
  report.save_grid(run.fp_images[:64], os.path.join(workdir, "samples_fp.png"))
  print(report.markdown_table([row]))
  print(f"checkpoint: {ckpt}; metrics: {workdir}/metrics.json")


if __name__ == "__main__":
  app.run(main)
