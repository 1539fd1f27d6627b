"""Survey-style tables (Markdown + CSV) and image grids from benchmark rows."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np

from dqjax import atomic

# (column title, row key, format); ↑/↓ say which direction is better, as in the survey's tables.
COLUMNS = (
    ("Method", "method", "{}"),
    ("W/A", "setting", "{}"),
    ("Size (MB)", "size_mb", "{:.3f}"),
    ("BOPs (G)", "bops_g", "{:.3f}"),
    ("IS ↑", "is", "{:.2f}"),
    ("FID ↓", "fid", "{:.2f}"),
    ("sFID ↓", "sfid", "{:.2f}"),
    ("Prec. ↑", "precision", "{:.3f}"),
    ("Rec. ↑", "recall", "{:.3f}"),
    ("Cond. acc ↑", "cond_acc", "{:.3f}"),
    ("PSNR vs FP ↑", "psnr", "{:.2f}"),
    ("SSIM vs FP ↑", "ssim", "{:.3f}"),
    ("Quant. time (s)", "quant_seconds", "{:.0f}"),   # calibration / training wall time of the method
)
SETTING_ORDER = {"FP": 0, "W8A8": 1, "W4A8": 2, "W4A4": 3, "W8A4": 4, "W3A16": 5, "W2A16": 6, "W1A8": 7,
                 "W1A4": 8, "W1A1": 9}


def _fmt(fmt, v):
  if v is None:
    return "–"
  if isinstance(v, float) and math.isinf(v):
    return "∞"
  try:
    return fmt.format(v)
  except (ValueError, TypeError):
    return str(v)


def sort_rows(rows: Sequence[dict]) -> list[dict]:
  return sorted(rows, key=lambda r: (r["model"], SETTING_ORDER.get(r["setting"], 10), r["method"] != "minmax",
                                     r["method"] != "mse", r["method"]))


def markdown_table(rows: Sequence[dict], *, title: str = "") -> str:
  """One table per model, rows grouped by bit setting like the survey's."""
  out = []
  failed = [r for r in rows if r.get("error")]
  rows = [r for r in rows if not r.get("error")]
  for model in sorted({r["model"] for r in rows}):
    mrows = sort_rows([r for r in rows if r["model"] == model])
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in mrows)]
    n = mrows[0].get("num_samples", "?")
    out.append(f"### {title}{model} ({n} samples per row)\n")
    out.append("| " + " | ".join(c[0] for c in cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in mrows:
      out.append("| " + " | ".join(_fmt(c[2], r.get(c[1])) for c in cols) + " |")
    out.append("")
  if failed:
    out.append("Rows not run (the method refused the setting or failed):\n")
    out += [f"- {r['model']} {r['method']} {r['setting']}: {r['error']}" for r in sort_rows(failed)]
    out.append("")
  return "\n".join(out)


def _entry(r: dict) -> str:
  return f"{r['method']} {_fmt('{:.2f}', r.get('psnr'))} dB / {_fmt('{:.2f}', r.get('fid'))}"


def winners_table(rows: Sequence[dict]) -> str:
  """"Which method wins at this setting on this model?": per model and bit setting, the methods ranked by
  paired PSNR against FP from the same noise (the low-variance column; FID on a few hundred samples can
  rank a row that changed the samples above FP itself), each as `method PSNR dB / FID`, next to the
  min-max baseline and the row with the lowest FID. Rows without a finite PSNR (FP, failures) are left out."""
  ok = [r for r in rows if not r.get("error") and r.get("setting") != "FP" and r.get("psnr") is not None
        and math.isfinite(r["psnr"])]
  keys = sorted({(r["model"], r["setting"]) for r in ok}, key=lambda k: (k[0], SETTING_ORDER.get(k[1], 10), k[1]))
  if not keys:
    return ""
  out = ["| Model | W/A | rows | best (PSNR vs FP / FID) | 2nd | 3rd | minmax | lowest FID |", "|" + "---|" * 8]
  for model, setting in keys:
    group = sorted((r for r in ok if (r["model"], r["setting"]) == (model, setting)),
                   key=lambda r: (-r["psnr"], r["method"]))
    ranked = [_entry(r) for r in group[:3]] + ["–"] * max(0, 3 - len(group))
    base = next((_entry(r) for r in group if r["method"] == "minmax"), "–")
    fids = [r for r in group if r.get("fid") is not None]
    low = _entry(min(fids, key=lambda r: (r["fid"], r["method"]))) if fids else "–"
    out.append(f"| {model} | {setting} | {len(group)} | " + " | ".join(ranked) + f" | {base} | {low} |")
  return "\n".join(out) + "\n"


def _setting_key(setting: str):
  return SETTING_ORDER.get(setting, 10), setting


def coverage_table(rows: Sequence[dict], planned: Sequence[tuple[str, str, str]]) -> str:
  """How much of a suite's plan the rows cover: one sentence when it is complete; otherwise measured /
  planned per model and setting and the missing rows, so that a partial table says what it lacks."""
  key = lambda r: (r["model"], r["method"], r["setting"])
  measured = {key(r) for r in rows if not r.get("error")}
  failed = {key(r) for r in rows if r.get("error")}
  plan = list(dict.fromkeys(planned))
  done = [k for k in plan if k in measured]
  extra = len(measured - set(plan))
  out = [f"{len(done)} of the suite's {len(plan)} rows measured" +
         (f", {sum(k in failed for k in plan)} refused or failed" if failed & set(plan) else "") +
         (f"; {extra} further row{'s' * (extra != 1)} in this directory (other settings or methods) "
          f"{'are' if extra != 1 else 'is'} in the tables too" if extra else "")
         + "."]
  missing = [k for k in plan if k not in measured and k not in failed]
  if not missing:
    return out[0] + "\n"
  settings = sorted({s for _, _, s in plan}, key=_setting_key)
  out += ["", "| Model | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
  for model in dict.fromkeys(m for m, _, _ in plan):
    cells = []
    for setting in settings:
      want = [k for k in plan if k[0] == model and k[2] == setting]
      cells.append(f"{sum(k in measured for k in want)}/{len(want)}" if want else "–")
    out.append(f"| {model} | " + " | ".join(cells) + " |")
  out += ["", "Not yet run:", ""]
  for model in dict.fromkeys(m for m, _, _ in missing):
    by_method: dict[str, list[str]] = {}
    for m, method, setting in missing:
      if m == model:
        by_method.setdefault(method, []).append(setting)
    out.append(f"- {model} ({sum(len(v) for v in by_method.values())}): " +
               "; ".join(f"{method} {', '.join(v)}" for method, v in by_method.items()))
  return "\n".join(out) + "\n"


def _hours(h: float, kind: str = "") -> str:
  return f"{h:.1f} {kind}hours" if h >= 1 else f"{60 * h:.0f} {kind}minutes"


def cost_table(rows: Sequence[dict], planned: Sequence[tuple[str, str, str]] = (), workers: int = 1) -> str:
  """Where a suite's time goes: process-minutes of each method's rows per model (each row records its own
  time: quantization + sampling + metrics), the total, and the cost of the whole `planned` suite, rows without
  a time estimated from the same method on the same model (else the same method, else all rows)."""
  timed = [r for r in rows if r.get("row_seconds") is not None]
  if not timed:
    return ""
  models = sorted({r["model"] for r in timed})
  minutes: dict[tuple[str, str], list[float]] = {}
  for r in timed:
    minutes.setdefault((r["method"], r["model"]), []).append(r["row_seconds"] / 60)
  methods = sorted({m for m, _ in minutes}, key=lambda m: (-sum(sum(v) for (mm, _), v in minutes.items() if mm == m), m))
  out = ["| Method | rows | " + " | ".join(models) + " | total (min) |", "|---|---|" + "---|" * (len(models) + 1)]
  for method in methods:
    cells = [sum(minutes.get((method, model), [])) for model in models]
    n = sum(len(minutes.get((method, model), [])) for model in models)
    out.append(f"| {method} | {n} | " + " | ".join(f"{c:.1f}" if c else "–" for c in cells) + f" | {sum(cells):.1f} |")
  total = sum(r["row_seconds"] for r in timed) / 3600
  out += ["", f"The {len(timed)} timed rows took {_hours(total, 'process-')} "
              f"(mean {60 * total / len(timed):.1f} min per row)."]
  timed_keys = {(r["model"], r["method"], r["setting"]) for r in timed}
  plan = set(planned)
  unknown = [k for k in dict.fromkeys(planned) if k not in timed_keys]    # not run yet, or run without a time
  if unknown:
    mean = lambda v: sum(v) / len(v)
    overall = mean([r["row_seconds"] / 60 for r in timed])

    def guess(model: str, method: str) -> float:
      if (method, model) in minutes:
        return mean(minutes[(method, model)])
      same_method = [x for (m, _), v in minutes.items() if m == method for x in v]
      return mean(same_method) if same_method else overall

    whole = (sum(r["row_seconds"] for r in timed if (r["model"], r["method"], r["setting"]) in plan) / 60 +
             sum(guess(model, method) for model, method, _ in unknown)) / 60
    out[-1] += (f" The whole suite ({len(plan)} rows) needs about {_hours(whole, 'process-')} — the "
                f"{len(unknown)} rows without a time (not yet run, or measured before rows were timed) estimated from "
                f"the same method's rows — ≈ {_hours(whole / max(workers, 1))} of wall time in {workers} processes.")
  return "\n".join(out) + "\n"


def csv_table(rows: Sequence[dict]) -> str:
  keys = ["model", "family", "method", "setting", "w_bits", "a_bits"] + [c[1] for c in COLUMNS[2:]] + [
      "row_seconds", "num_samples"]       # COLUMNS already ends with quant_seconds
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
  w.writeheader()
  for r in sort_rows([r for r in rows if not r.get("error")]):
    w.writerow(r)
  return buf.getvalue()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images → uint8."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
  """Tile [N, H, W, C] images in [-1, 1] into one uint8 image."""
  imgs = to_uint8(images)
  n, h, w, c = imgs.shape
  nrow = int(math.ceil(n / ncol))
  canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
  return canvas


def save_grid(images: np.ndarray, path: str, ncol: int = 8) -> str:
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  g = grid(images, ncol)
  Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(path)
  return path


def write_reports(rows: Sequence[dict], workdir: str, *, header: str = "",
                  planned: Sequence[tuple[str, str, str]] = (), workers: int = 1) -> dict:
  """tables.md (the ranking by paired PSNR first, the coverage of the `planned` rows, one table per model,
  then where the time went) and table.csv in the workdir; returns their paths."""
  md = os.path.join(workdir, "tables.md")
  cs = os.path.join(workdir, "table.csv")
  ranking = winners_table(rows)
  cost = cost_table(rows, planned, workers)
  body = ((f"### Which method wins\n\n{ranking}\n" if ranking else "") +
          (f"### Coverage\n\n{coverage_table(rows, planned)}\n" if planned else "") + markdown_table(rows) +
          (f"\n### Where the time goes (process-minutes per model)\n\n{cost}" if cost else ""))
  with open(md, "w") as f:
    f.write(header + "\n\n" + body)
  with open(cs, "w") as f:
    f.write(csv_table(rows))
  return {"markdown": md, "csv": cs, "body": body}


TABLES_HEADING = "## Tables\n"


def check_publish_target(doc: str) -> str:
  """The text of results page `doc`, or a ValueError naming the flag when it is missing or has no
  `## Tables` heading (checked before a bench starts, not after hours of rows)."""
  if not os.path.isfile(doc):
    raise ValueError(f"--publish_to={doc!r}: no such file; give an existing results page such as "
                     "docs/results/survey.md")
  with open(doc) as f:
    text = f.read()
  if TABLES_HEADING not in text:
    raise ValueError(f"--publish_to={doc!r} has no '{TABLES_HEADING.strip()}' heading to put the tables under")
  return text


def publish(body: str, rows: Sequence[dict], doc: str) -> list[str]:
  """Replace everything after the `## Tables` heading of the results page `doc` (its prose, written by hand,
  stays) with the generated tables, and write the rows' CSV beside it (`doc` with .csv). Returns both paths."""
  text = check_publish_target(doc)
  text = text[:text.index(TABLES_HEADING)] + TABLES_HEADING + "\n" + body
  out_csv = os.path.splitext(doc)[0] + ".csv"
  return [atomic.write_text(doc, text), atomic.write_text(out_csv, csv_table(rows))]
