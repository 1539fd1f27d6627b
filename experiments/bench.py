r"""Run a benchmark suite: quantize zoo models with every requested method and bit setting, and write
survey-style tables, image grids and per-row metrics into a run directory (resumable).

  python -m experiments.bench --config=configs/bench/quick.py --workdir=runs/quick
  python -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey
  python -m experiments.bench --config=configs/bench/quick.py --config.methods='("minmax","mse")' \
      --config.settings='("W4A8",)' --workdir=runs/mine
  python -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey --report_only
      # runs nothing: tables of every row finished in the workdir (by any invocation), coverage of the suite
  python -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey --report_only \
      --publish_to=docs/results/survey.md
      # also puts the tables under that page's "## Tables" heading (its prose stays) and writes survey.csv
  python -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey \
      --seed_rows_from=docs/results/survey.csv
      # on a new machine: the committed rows count as done, only rows missing from the CSV run
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags
from ml_collections import config_flags

from dqjax import atomic, compile_cache
from dqjax.benchmark import report, runner

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench/quick.py", "bench suite config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/quick", "run directory (resumes if it exists)")
_OVERRIDES = flags.DEFINE_string(
    "method_overrides", None, 'JSON {method: {config field: value}} on top of the suite config\'s overrides, '
    'e.g. \'{"tac_qdm": {"mask_keep": 1.0}}\'; rows keep the method\'s name, so give them their own --workdir')
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "run nothing: write the tables of every row finished in the "
                                   "workdir and their coverage of the suite")
_SEED_ROWS = flags.DEFINE_string("seed_rows_from", None, "a committed results CSV (e.g. docs/results/survey.csv): "
                                 "its rows count as finished in the workdir (no grids or per-step errors for them)")
_PUBLISH_TO = flags.DEFINE_string("publish_to", None, "a results page (e.g. docs/results/survey.md): replace what "
                                  "follows its '## Tables' heading with the tables and write its .csv beside it")


def _overrides(text: str) -> dict:
  try:
    return runner.parse_method_overrides(text)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  del argv
  compile_cache.enable()
  cfg = _CONFIG.value
  if _OVERRIDES.value:
    cfg.method_overrides = {**dict(cfg.get("method_overrides", {})), **_overrides(_OVERRIDES.value)}
  suite = runner.suite_from_config(cfg)          # validates every field before heavy work
  if _PUBLISH_TO.value:
    try:
      report.check_publish_target(_PUBLISH_TO.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  if _SEED_ROWS.value:
    try:
      print(f"{runner.seed_rows_from_csv(_SEED_ROWS.value, workdir)} rows restored from {_SEED_ROWS.value}")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  if not _REPORT_ONLY.value:
    atomic.write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json_best_effort()))
  start = time.perf_counter()
  if _REPORT_ONLY.value:
    rows = runner.load_rows(workdir)    # every finished row, also those of other invocations' settings
  else:
    rows = runner.run_suite(suite, workdir)
  wall = time.perf_counter() - start
  ran = ("tables written from the finished rows (--report_only); each row's own time is in the last table"
         if _REPORT_ONLY.value else f"wall time of this invocation {wall:.0f} s (rows resumed from an earlier run "
         "are not re-timed; each row's own time is in the last table)")
  header = (f"# {cfg.get('title', 'dqjax benchmark')}\n\nMachine: {platform.machine()}, "
            f"{os.cpu_count()} CPU cores; date {time.strftime('%Y-%m-%d')}; {ran}.")
  paths = report.write_reports(rows, workdir, header=header, planned=runner.planned_rows(suite),
                               workers=suite.workers)
  atomic.write_json(os.path.join(workdir, "metrics.json"), {"rows": rows, "wall_seconds": wall})
  print(open(paths["markdown"]).read())
  print(f"wrote {paths['markdown']}, {paths['csv']} and grids under {workdir}/grids ({wall:.0f} s)")
  if _PUBLISH_TO.value:
    print("published " + " and ".join(report.publish(paths["body"], rows, _PUBLISH_TO.value)))


if __name__ == "__main__":
  app.run(main)
