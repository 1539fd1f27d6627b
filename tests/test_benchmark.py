"""The benchmark: config validation before heavy work, an end-to-end tiny suite on a shipped model,
resume, worker processes, tables."""
import dataclasses
import os
import shutil

import numpy as np
import pytest

from configs.bench import quick
from dqjax.benchmark import report, runner


def _cfg(**changes):
  c = quick.get_config()
  for k, v in changes.items():
    c[k] = v
  return c


@pytest.mark.parametrize("field,value,message", [
    ("models", ("cifar-ddpm",), "field models has unknown model 'cifar-ddpm'; accepted values: ddpm-mnist"),
    ("methods", ("q_diffusion_typo",), "field methods has unknown method 'q_diffusion_typo'; accepted values: all"),
    ("settings", ("W9A8",), "weight bits=9 in 'W9A8' is out of range"),
    ("settings", ("4bit",), "malformed"),
    ("num_samples", -4, "num_samples=-4 must be a positive integer"),
    ("workers", 0, "workers=0 must be a positive integer"),
    ("calib_policy", "sometimes", "calib_policy='sometimes'"),
    ("method_overrides", {"tac_qdn": {"mask_keep": 1.0}}, "method_overrides has unknown method 'tac_qdn'"),
])
def test_bad_config_is_refused_before_work(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    runner.suite_from_config(_cfg(**{field: value}))


def test_tiny_suite_end_to_end_and_resume(tmp_path):
  # 8 samples in one batch of 8, as the calibration trajectories: the FP sampler compiles once for both
  small = dict(methods=("minmax",), num_samples=8, batch_size=8, calib_samples=8, calib_steps=2)
  suite = runner.suite_from_config(_cfg(settings=("W8A8",), **small))
  rows = runner.run_suite(suite, str(tmp_path))
  assert [(r["method"], r["setting"]) for r in rows] == [("fp", "FP"), ("minmax", "W8A8")]
  fp, q = rows
  assert fp["psnr"] == float("inf") and fp["ssim"] == pytest.approx(1.0)
  assert np.isfinite(q["psnr"]) and q["psnr"] > 10          # W8A8 stays close to FP from the same noise
  assert q["size_mb"] < fp["size_mb"] / 3.5 and q["bops_g"] < fp["bops_g"] / 10
  assert q["row_seconds"] > q["quant_seconds"] > 0           # the row's own time includes sampling + metrics
  assert os.path.exists(tmp_path / "grids" / "ldm-mnist__minmax__W8A8.png")
  mtime = os.path.getmtime(runner.row_path(str(tmp_path), "ldm-mnist", "minmax", "W8A8"))
  again = runner.run_suite(suite, str(tmp_path))                 # resumes: nothing recomputed
  assert os.path.getmtime(runner.row_path(str(tmp_path), "ldm-mnist", "minmax", "W8A8")) == mtime
  assert [r["fid"] for r in again] == [r["fid"] for r in rows]
  # report-only reads the finished rows; a wider suite's coverage names the row it lacks
  wider = runner.suite_from_config(_cfg(settings=("W8A8", "W4A8"), **small))
  done = runner.load_rows(str(tmp_path))
  assert sorted((r["method"], r["setting"]) for r in done) == [("fp", "FP"), ("minmax", "W8A8")]
  coverage = report.coverage_table(done, runner.planned_rows(wider))
  assert coverage.startswith("2 of the suite's 3 rows measured.") and "- ldm-mnist (1): minmax W4A8" in coverage
  # workers=2, resuming a workdir that has only the FP row (as an interrupted run leaves it): the FP row is
  # kept, the quantized rows run in two spawned processes and equal the serial rows bit for bit
  fp_row = runner.row_path(str(tmp_path / "workers"), "ldm-mnist", "fp", "FP")
  os.makedirs(os.path.dirname(fp_row))
  shutil.copy(runner.row_path(str(tmp_path), "ldm-mnist", "fp", "FP"), fp_row)
  parallel = runner.run_suite(dataclasses.replace(wider, workers=2), str(tmp_path / "workers"))
  assert [(r["method"], r["setting"]) for r in parallel] == [("fp", "FP"), ("minmax", "W8A8"), ("minmax", "W4A8")]
  assert all("error" not in r for r in parallel)
  assert not os.path.exists(tmp_path / "workers" / "grids" / "ldm-mnist__fp__FP.png")   # not recomputed
  timing = ("quant_seconds", "row_seconds")
  assert {k: v for k, v in parallel[1].items() if k not in timing} == {k: v for k, v in q.items() if k not in timing}
  np.testing.assert_array_equal(np.load(tmp_path / "workers" / "samples" / "ldm-mnist__minmax__W8A8.npy"),
                                np.load(tmp_path / "samples" / "ldm-mnist__minmax__W8A8.npy"))
  assert len(os.listdir(tmp_path / "workers" / "logs")) == 2          # one log per worker process
  md = report.markdown_table(rows)
  assert "| minmax | W8A8 |" in md and "FID ↓" in md
  assert report.csv_table(rows).splitlines()[0].startswith("model,family,method,setting")


def test_worker_handoff_keeps_jax_arrays():
  """A worker receives the prepared model as the parent has it: recipes index calibration data with traced
  indices, which numpy arrays refuse (TDQ failed in a worker when the hand-off converted to numpy)."""
  import pickle
  import jax
  import jax.numpy as jnp
  from dqjax.calib.data import CalibData
  run = runner.ModelRun(entry=object(), noise=jnp.zeros((2, 3)), conds=None, labels=None,
                        fp_images=np.zeros((2, 3)), fp_traj=None, calib=CalibData(jnp.ones((2, 1, 3)), jnp.arange(2)))
  back = pickle.loads(pickle.dumps(runner._without_entry(run)))
  assert back.entry is None and isinstance(back.noise, jax.Array) and isinstance(back.calib.ts, jax.Array)
  assert int(jax.jit(lambda i: back.calib.ts[i])(1)) == 1


def test_method_overrides_flag_is_parsed_or_refused_with_the_expected_shape():
  assert runner.parse_method_overrides('{"tac_qdm": {"mask_keep": 1.0}}') == {"tac_qdm": {"mask_keep": 1.0}}
  with pytest.raises(ValueError, match="is not JSON"):
    runner.parse_method_overrides("{tac_qdm: 1}")
  with pytest.raises(ValueError, match="JSON object"):
    runner.parse_method_overrides('{"tac_qdm": 1.0}')
  cfg = _cfg(methods=("tac_qdm",))
  cfg.method_overrides = runner.parse_method_overrides('{"tac_qdm": {"mask_keep": 1.0}}')
  suite = runner.suite_from_config(cfg)
  assert runner.method_config("tac_qdm", dict(suite.method_overrides)["tac_qdm"]).mask_keep == 1.0


def test_winners_table_ranks_by_paired_psnr_and_shows_the_baseline():
  row = lambda method, setting, psnr, fid, **kw: dict(model="ldm-mnist", method=method, setting=setting,
                                                     psnr=psnr, fid=fid, **kw)
  rows = [row("fp", "FP", float("inf"), 6.1), row("minmax", "W4A8", 12.2, 17.9), row("mse", "W4A8", 10.6, 29.0),
          row("tfmq_dm", "W4A8", 24.1, 6.0), row("ptqd", "W4A8", 22.1, 5.5), row("minmax", "W8A8", 33.6, 6.1),
          row("qdm", "W4A8", None, None, error="refused")]
  lines = report.winners_table(rows).splitlines()
  assert len(lines) == 4                                   # header, rule, W8A8, W4A8 (FP and failures left out)
  assert lines[2].startswith("| ldm-mnist | W8A8 | 1 | minmax 33.60 dB / 6.10 | – | – | minmax 33.60 dB / 6.10 |")
  assert lines[3] == ("| ldm-mnist | W4A8 | 4 | tfmq_dm 24.10 dB / 6.00 | ptqd 22.10 dB / 5.50 | "
                      "minmax 12.20 dB / 17.90 | minmax 12.20 dB / 17.90 | ptqd 22.10 dB / 5.50 |")
  assert report.winners_table(rows[:1]) == ""


def test_coverage_and_cost_tables_count_planned_measured_and_missing_rows():
  row = lambda model, method, setting, sec, **kw: dict(model=model, method=method, setting=setting, row_seconds=sec, **kw)
  rows = [row("ldm-mnist", "fp", "FP", 60), row("ldm-mnist", "minmax", "W8A8", 120),
          row("ldm-mnist", "q_diffusion", "W8A8", 600), row("ddpm-mnist", "q_diffusion", "W8A8", 1800),
          row("ldm-mnist", "minmax", "W8A4", 90), dict(model="ldm-mnist", method="bidm", setting="W8A8", error="W1A1 only")]
  planned = [("ldm-mnist", "fp", "FP"), ("ldm-mnist", "minmax", "W8A8"), ("ldm-mnist", "q_diffusion", "W8A8"),
             ("ldm-mnist", "q_diffusion", "W4A8"), ("ldm-mnist", "bidm", "W8A8"), ("ddpm-mnist", "q_diffusion", "W8A8"),
             ("ddpm-mnist", "minmax", "W8A8")]
  coverage = report.coverage_table(rows, planned).splitlines()
  assert coverage[0] == ("4 of the suite's 7 rows measured, 1 refused or failed; 1 further row in this directory "
                         "(other settings or methods) is in the tables too.")
  assert "| ldm-mnist | 1/1 | 2/3 | 0/1 |" in coverage          # FP, W8A8 (bidm refused), W4A8
  assert coverage[-2:] == ["- ldm-mnist (1): q_diffusion W4A8", "- ddpm-mnist (1): minmax W8A8"]
  assert report.coverage_table(rows, planned[:3]) == "3 of the suite's 3 rows measured; 2 further rows in this directory (other settings or methods) are in the tables too.\n"
  cost = report.cost_table(rows, planned, workers=2).splitlines()
  assert cost[2] == "| q_diffusion | 2 | 30.0 | 10.0 | 40.0 |"   # most expensive first; ddpm-mnist, ldm-mnist
  # whole plan: the 4 timed planned rows (43 min), bidm (refused, no time: all rows' mean 8.9), q_diffusion W4A8
  # on ldm-mnist ≈ its W8A8 row (10), minmax on ddpm-mnist ≈ minmax elsewhere (1.75) → 63.6 min
  assert cost[-1] == ("The 5 timed rows took 44 process-minutes (mean 8.9 min per row). The whole suite (7 rows) "
                      "needs about 1.1 process-hours — the 3 rows without a time (not yet run, or measured before "
                      "rows were timed) estimated from the same method's rows — ≈ 32 minutes of wall time in 2 "
                      "processes.")
  assert report.cost_table([dict(model="m", method="x", setting="W8A8")]) == ""


def test_method_config_refuses_a_missing_configs_package(monkeypatch):
  import importlib
  assert runner.method_config("minmax") is None                  # a method without a config file
  assert runner.method_config("tuneqdm", {"lr": 1e-4}).lr == 1e-4
  def no_configs(name):
    raise ModuleNotFoundError("No module named 'configs'", name="configs")
  monkeypatch.setattr(importlib, "import_module", no_configs)
  with pytest.raises(ModuleNotFoundError, match="method configs .* are not importable"):
    runner.method_config("tuneqdm")


def test_csv_table_names_every_column_once():
  """survey.csv had two quant_seconds columns (a reader keeps only one of them)."""
  import csv
  row = {"model": "m", "family": "baseline", "method": "minmax", "setting": "W8A8", "w_bits": 8, "a_bits": 8,
         "fid": 1.5, "quant_seconds": 2.0, "row_seconds": 3.0, "num_samples": 16}
  text = report.csv_table([row])
  header = text.splitlines()[0].split(",")
  assert len(header) == len(set(header)) and header.count("quant_seconds") == 1
  parsed = next(csv.DictReader(text.splitlines()))
  assert (parsed["quant_seconds"], parsed["row_seconds"], parsed["fid"]) == ("2.0", "3.0", "1.5")


def test_publish_replaces_only_the_tables_section(tmp_path):
  doc = tmp_path / "survey.md"
  doc.write_text("# Survey\n\nProse written by hand.\n\n## Tables\n\nold tables\n")
  row = {"model": "m", "family": "baseline", "method": "minmax", "setting": "W8A8", "fid": 2.0}
  paths = report.publish("### m\n\nnew tables\n", [row], str(doc))
  assert doc.read_text() == "# Survey\n\nProse written by hand.\n\n## Tables\n\n### m\n\nnew tables\n"
  assert paths[1] == str(tmp_path / "survey.csv") and "minmax,W8A8" in (tmp_path / "survey.csv").read_text()
  (tmp_path / "other.md").write_text("# no tables heading\n")
  with pytest.raises(ValueError, match="has no '## Tables' heading"):
    report.check_publish_target(str(tmp_path / "other.md"))
  with pytest.raises(ValueError, match="no such file"):
    report.check_publish_target(str(tmp_path / "missing.md"))


def test_rows_seeded_from_a_results_csv_round_trip(tmp_path):
  """A new machine resumes a suite from the committed CSV: its rows come back as finished rows, floats exact."""
  rows = [{"model": "ldm-mnist", "family": "baseline", "method": "minmax", "setting": "W4A8", "w_bits": 4,
           "a_bits": 8, "fid": 16.94137123456789, "psnr": float("inf"), "cond_acc": None, "quant_seconds": 1.5,
           "row_seconds": 2.25, "num_samples": 256}]
  csv_path = tmp_path / "survey.csv"
  csv_path.write_text(report.csv_table(rows))
  assert runner.seed_rows_from_csv(str(csv_path), str(tmp_path / "w")) == 1
  (back,) = runner.load_rows(str(tmp_path / "w"))
  assert back.pop("restored_from_csv") is True
  assert {k: v for k, v in back.items() if v is not None} == {k: v for k, v in rows[0].items() if v is not None}
  assert runner.seed_rows_from_csv(str(csv_path), str(tmp_path / "w")) == 0          # present rows are kept
  (tmp_path / "bad.csv").write_text("model,method\nldm-mnist,minmax\n")
  with pytest.raises(ValueError, match="line 2 is not a results row"):
    runner.seed_rows_from_csv(str(tmp_path / "bad.csv"), str(tmp_path / "w2"))
  with pytest.raises(ValueError, match="no such file"):
    runner.seed_rows_from_csv(str(tmp_path / "missing.csv"), str(tmp_path / "w2"))
