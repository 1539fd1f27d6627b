"""Error analysis, the survey's qualitative part: activation ranges over timesteps, per-step error
trajectories, per-layer sensitivity, FP-vs-method image grids."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.transform.rules import Plan


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def activation_ranges_over_time(qm, data: CalibData, layers: Optional[Sequence[str]] = None) -> dict:
  """{layer: (t [S], lo [S], hi [S])} per-tensor input range of each layer at every calibration step."""
  ranges = calibrate.activation_ranges(qm, data)
  layers = layers or list(ranges)
  out = {}
  for path in layers:
    if path not in ranges:
      raise ValueError(f"layer {path!r} has no observed activation; known: {', '.join(sorted(ranges))}")
    name = "input" if "input" in ranges[path] else sorted(ranges[path])[0]
    lo, hi = ranges[path][name]
    out[path] = (np.asarray(data.ts), np.asarray(lo).min(axis=-1), np.asarray(hi).max(axis=-1))
  return out


def plot_activation_ranges(ranges: dict, path: str, title: str = "Activation range over timesteps") -> str:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (layer, (t, lo, hi)) in enumerate(ranges.items()):
    color = plt.cm.tab10(i % 10)
    ax.fill_between(t, lo, hi, alpha=0.15, color=color)
    ax.plot(t, hi, color=color, label=layer)
    ax.plot(t, lo, color=color, linestyle="--")
  ax.set_xlabel("timestep t")
  ax.set_ylabel("activation min / max")
  ax.invert_xaxis()
  ax.set_title(title)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def line_looks(n: int, colors: Sequence[str]) -> list[tuple[str, str]]:
  """n distinct (color, line style) pairs: the colour cycle first, then the same colours dashed, dotted..."""
  styles = ("-", "--", ":", "-.")
  if n > len(colors) * len(styles):
    raise ValueError(f"{n} lines need more than {len(colors)} colours × {len(styles)} line styles")
  return [(colors[i % len(colors)], styles[i // len(colors)]) for i in range(n)]


def plot_error_trajectories(rows: Sequence[dict], path: str, *, model: str, setting: str) -> str:
  """Per-step MSE between FP and quantized sampling trajectories (same noise), one line per method; the
  legend lists the methods from the largest final error to the smallest, and past ten methods the line
  style changes so that no two methods share a look. Steps where the error is exactly 0 (the shared x_T)
  are not drawn, so the axis spans the errors themselves."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  chosen = [r for r in rows if r["model"] == model and r["setting"] == setting and r.get("traj_mse")]
  chosen.sort(key=lambda r: (-float(r["traj_mse"][-1]), r["method"]))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for r, (color, style) in zip(chosen, line_looks(len(chosen), colors)):
    err = np.asarray(r["traj_mse"], np.float64)
    ax.semilogy(np.arange(len(err)), np.where(err > 0, err, np.nan), label=r["method"], color=color,
                linestyle=style)
  ax.set_xlabel("sampler step (0 = noisiest)")
  ax.set_ylabel("MSE(x_t quantized, x_t FP)")
  ax.set_title(f"{model} {setting}: error accumulation along the trajectory")
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def layer_sensitivity(qm, data: CalibData, *, max_layers: Optional[int] = None) -> list[tuple[str, float]]:
  """Output MSE against FP when only one layer is quantized (its calibrated state), for every quantized
  op; sorted from most to least sensitive. Uses the calibration inputs of every step."""
  x, t, c = data.flat()
  fp = jax.jit(lambda: qm.model.apply({"params": qm.fp_params}, x, t, c))()
  results = []
  ops = [op for op in qm.plan.ops if op.quantized][:max_layers]
  for op in tqdm(ops, desc="sensitivity", unit="layer"):
    only = Plan(tuple(o if o.path == op.path else _float(o) for o in qm.plan.ops))
    one = qm.replace(plan=only)
    out = jax.jit(lambda: one.apply(x, t, c))()
    results.append((op.path, float(jnp.mean((out - fp) ** 2))))
  return sorted(results, key=lambda r: -r[1])


def step_error_profile(qm, data: CalibData) -> list[dict]:
  """Per calibration step: the relative ε error ‖ε_q − ε_fp‖² / ‖ε_fp‖², and the *shared* share of it — the
  energy of the batch-mean error over the error's energy. Shared error does not average out across samples
  and pushes every trajectory the same way (what PTQD / D²-DPM fit); weight-space MSE does not see it."""
  run = jax.jit(lambda x, t, c: (qm.model.apply({"params": qm.fp_params}, x, t, c), qm.apply(x, t, c)))
  out = []
  for i in range(data.num_steps):
    x, c = data.xs[i], None if data.conds is None else jax.tree_util.tree_map(lambda a: a[i], data.conds)
    fp, q = run(x, jnp.full((x.shape[0],), data.ts[i]), c)
    d = q - fp
    err = float(jnp.mean(d ** 2))
    out.append({"t": float(data.ts[i]), "rel_error": err / float(jnp.mean(fp ** 2)),
                "shared_share": float(jnp.mean(jnp.mean(d, axis=0) ** 2)) / max(err, 1e-30)})
  return out


def step_error_table(profiles: dict) -> str:
  """Markdown: one row per step, relative ε error and shared share for each method; means last."""
  names = list(profiles)
  head = "| t | " + " | ".join(f"{n}: rel. ε error | {n}: shared share" for n in names) + " |"
  lines = [head, "|---|" + "---|---|" * len(names)]
  for i, step in enumerate(profiles[names[0]]):
    cells = [f"{profiles[n][i]['rel_error']:.4f} | {profiles[n][i]['shared_share']:.2f}" for n in names]
    lines.append(f"| {step['t']:.0f} | " + " | ".join(cells) + " |")
  means = [f"{np.mean([s['rel_error'] for s in profiles[n]]):.4f} | "
           f"{np.mean([s['shared_share'] for s in profiles[n]]):.2f}" for n in names]
  lines.append("| mean | " + " | ".join(means) + " |")
  return "\n".join(lines)


def _float(op):
  import dataclasses
  return dataclasses.replace(op, weight=None, acts=())


def sensitivity_table(results: Sequence[tuple[str, float]]) -> str:
  lines = ["| layer | output MSE when only this layer is quantized |", "|---|---|"]
  lines += [f"| {p} | {v:.3e} |" for p, v in results]
  return "\n".join(lines)


def comparison_grid(images: dict, path: str, n: int = 8) -> str:
  """One row per method (FP first) of the same n samples, so differences are visible side by side."""
  from dqjax.benchmark import report
  names = sorted(images, key=lambda k: k != "FP")
  stacked = np.concatenate([np.asarray(images[k][:n]) for k in names], axis=0)
  plt = _plt()
  g = report.grid(stacked, ncol=n)
  fig, ax = plt.subplots(figsize=(n * 0.6 + 1.5, len(names) * 0.65 + 0.3))
  ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray")
  step = g.shape[0] / len(names)
  ax.set_yticks([step * (i + 0.5) for i in range(len(names))], names, fontsize=7)
  ax.set_xticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
