"""`experiments.quantize`: a rerun reuses the checkpoint and reproduces the metrics; a checkpoint made for
another setting is not reused; bad flags stop before any work."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model=ldm-mnist", "--method=minmax", "--num_samples=8", "--calib_samples=4", "--calib_steps=2"]


def _run(workdir, *flags, cache="off"):
  env = {**os.environ, "DQJAX_COMPILE_CACHE": cache, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "experiments.quantize", f"--workdir={workdir}", *SMALL, *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def test_rerun_reuses_the_checkpoint_and_a_stale_one_is_replaced(tmp_path):
  wd, cache = str(tmp_path / "run"), str(tmp_path / "xla_cache")   # reruns reuse the first run's compilations
  first = _run(wd, "--setting=W8A8", cache=cache)
  assert first.returncode == 0, first.stderr[-2000:]
  m1 = _metrics(wd)
  second = _run(wd, "--setting=W8A8", cache=cache)
  assert second.returncode == 0, second.stderr[-2000:]
  m2 = _metrics(wd)
  assert "not reusing" not in second.stdout
  assert m2["psnr"] == m1["psnr"] and m2["traj_mse"] == m1["traj_mse"]     # bit-identical samples
  assert m2["quant_seconds"] < m1["quant_seconds"]                          # restored, not recalibrated
  third = _run(wd, "--setting=W4A8", cache=cache)
  assert third.returncode == 0, third.stderr[-2000:]
  assert "it was made for setting='W8A8' (now 'W4A8')" in third.stdout
  assert _metrics(wd)["psnr"] != m1["psnr"]


def test_bad_flags_are_refused_before_any_work(tmp_path):
  out = _run(str(tmp_path / "bad"), "--model=ldm-cifar")
  assert out.returncode != 0 and "--model='ldm-cifar'; accepted values: ddpm-mnist, ldm-mnist" in out.stderr
  out = _run(str(tmp_path / "bad"), "--setting=W9A8")
  assert out.returncode != 0 and "--setting: weight bits=9 in 'W9A8' is out of range; accepted values: 1..8" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoint")
