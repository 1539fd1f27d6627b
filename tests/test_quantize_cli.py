"""`experiments.quantize`: a rerun reuses its checkpoint only when it was made for the same model, method
and setting (`runner.restore_quantized`); bad flags stop before any work."""
import os
import subprocess
import sys
import types

import jax
import numpy as np

from dqjax import checkpoint
from dqjax.benchmark import runner
from tests.test_deploy_checkpoint import _qm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"model": "tiny", "method": "minmax", "setting": "W8A8"}


def _saved(tmp_path):
  qm, x, t = _qm(8, 8)
  path = checkpoint.save(str(tmp_path / "checkpoint"), qm.plan, qm.params, qm.qstate,
                         metadata={**META, "forward": "QModel"})
  entry = types.SimpleNamespace(model=qm.model, params=qm.fp_params, num_train_timesteps=1000, env=lambda: None)
  return qm, x, t, path, entry


def test_matching_checkpoint_is_restored_exactly(tmp_path):
  qm, x, t, path, entry = _saved(tmp_path)
  back = runner.restore_quantized(path, entry, META)
  assert back is not None
  # bit-identical; jitted, as the samplers run it (op by op, the forward costs ~20 s of tiny compiles)
  out, ref = (np.asarray(jax.jit(m.apply)(x, t)) for m in (back, qm))
  np.testing.assert_array_equal(out, ref)


def test_checkpoint_for_another_setting_or_a_missing_one_is_not_reused(tmp_path, capsys):
  _, _, _, path, entry = _saved(tmp_path)
  assert runner.restore_quantized(path, entry, {**META, "setting": "W4A8", "method": "mse"}) is None
  out = capsys.readouterr().out
  assert "it was made for method='minmax' (now 'mse'), setting='W8A8' (now 'W4A8')" in out
  assert runner.restore_quantized(str(tmp_path / "nothing"), entry, META) is None
  assert f"not reusing {tmp_path / 'nothing'}" in capsys.readouterr().out


def _run(workdir, *flags):
  env = {**os.environ, "DQJAX_COMPILE_CACHE": "off", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.quantize", f"--workdir={workdir}", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bad_flags_are_refused_before_any_work(tmp_path):
  """One run names every bad flag (each with its accepted values), cleanly, and writes nothing."""
  out = _run(str(tmp_path / "bad"), "--model=ldm-cifar", "--method=nope", "--setting=W9A8", "--num_samples=0")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "--model='ldm-cifar'; accepted values: ddpm-mnist, ldm-mnist" in out.stderr
  assert "--method: unknown method 'nope'; accepted values: " in out.stderr
  assert "--setting: weight bits=9 in 'W9A8' is out of range; accepted values: 1..8" in out.stderr
  assert "--num_samples=0 must be positive" in out.stderr
  assert not os.path.exists(tmp_path / "bad")
