r"""Performance benchmarks (DESIGN.md §5): compiled vs eager calibration, reconstruction speed, sampling
(FP / simulated / deploy), weight memory, scaling, sharded calibration and sampling on 8 fake devices.

  python -m experiments.perf                                   # default config (≤ 15 min), writes the report
  python -m experiments.perf --config=configs/perf/quick.py    # ≤ 3 min
  python -m experiments.perf --check                           # regression guard: ratios vs the committed ones

Writes `<out_dir>/perf.md`, plots under `<out_dir>/perf/`, the ratios in `<ratio_file>` and every raw
number in `<out_dir>/perf/results.json`. `--check` re-measures the ratios (never absolute times) with the
given config, compares them with `<ratio_file>` (tolerance `config.tolerance`) and exits 1 on a regression;
it writes nothing. It is run by hand, not in CI (timings on shared CI machines are too noisy).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/perf/default.py", "perf config")
_CHECK = flags.DEFINE_bool("check", False, "recompute the ratios and compare them with the committed ones")
_WORKER = flags.DEFINE_string("sharded_worker", None, "internal: run the sharded measurements (JSON args)")


# --- benchmarks ---------------------------------------------------------------------------------------
def bench_calibration(cfg, name: str) -> dict:
  from dqjax import zoo
  from dqjax.benchmark import perf
  entry = zoo.load(name)
  data = perf.zoo_calibration_data(entry, cfg.calib_samples, cfg.calib_steps, cfg.seed)
  qm = perf.zoo_qmodel(entry)
  kw = dict(num_candidates=cfg.num_candidates)
  run = lambda: perf.jitted_calibration(qm, data, **kw)
  cal, w, c, l = perf.time_call(run)
  cold = perf.Timing([w], [c], [l])
  warm = perf.measure(lambda: run().qstate, repeats=cfg.repeats, warmup=0)
  from dqjax.calib import calibrate
  wq = calibrate.calibrate_weights(qm, "mse", num_candidates=cfg.num_candidates, p=2.0)
  jw = perf.measure(lambda: calibrate.calibrate_weights(qm, "mse", num_candidates=cfg.num_candidates,
                                                        p=2.0).qstate, repeats=cfg.repeats, warmup=0)
  ja = perf.measure(lambda: calibrate.calibrate_activations(wq, data, "mse", table=perf.TableSpec("per_step"),
                                                            num_candidates=cfg.num_candidates, p=2.4).qstate,
                    repeats=cfg.repeats, warmup=0)
  ew = perf.eager_weight_search(qm, num_candidates=cfg.num_candidates, channel_fraction=cfg.eager_channel_fraction,
                                disable_jit=cfg.eager_disable_jit)
  ea = perf.eager_activation_search(qm, data, num_candidates=cfg.num_candidates, num_steps=cfg.eager_steps,
                                    disable_jit=cfg.eager_disable_jit)
  # compiled repeats again after the (long) eager runs: both sides of the ratio see the same load drift
  warm2 = perf.measure(lambda: run().qstate, repeats=cfg.repeats, warmup=0)
  warm = perf.Timing(warm.wall + warm2.wall, warm.cpu + warm2.cpu, warm.load + warm2.load)
  tw, ta = ew.timing(), ea.timing()
  eager = perf.Timing([tw.median + ta.median], [tw.cpu_median + ta.cpu_median], [ew.load, ea.load])
  ops = [op for op in qm.plan.ops if op.quantized]
  out = {"ops": len(ops), "steps": data.num_steps, "samples": data.num_samples,
         "jit_cold": cold.to_dict(), "jit_warm": warm.to_dict(), "jit_weights": jw.to_dict(),
         "jit_acts": ja.to_dict(), "eager": eager.to_dict(), "eager_weights": tw.to_dict(),
         "eager_acts": ta.to_dict(), "eager_fraction_w": round(ew.fraction, 4),
         "eager_fraction_a": round(ea.fraction, 4),
         "speedup_cold": perf.ratio(eager, cold), "speedup_warm": perf.ratio(eager, warm),
         "speedup_cold_wall": perf.ratio(eager, cold, cpu=False),
         "speedup_warm_wall": perf.ratio(eager, warm, cpu=False),
         "agree_weights": perf.compare_weight_ranges(cal, ew), "agree_acts": perf.compare_activation_ranges(cal, ea)}
  logging.info("calibration %s: %s", name, {k: out[k] for k in ("speedup_cold", "speedup_warm")})
  return out


def bench_reconstruction(cfg, name: str) -> dict:
  from dqjax import zoo
  from dqjax.benchmark import perf
  from dqjax.calib import calibrate
  entry = zoo.load(name)
  data = perf.zoo_calibration_data(entry, cfg.calib_samples, cfg.recon_steps, cfg.seed)
  qm = calibrate.calibrate_weights(perf.zoo_qmodel(entry, 4, 8), "mse")
  out = {}
  for phase in cfg.recon_phases:
    q = qm if phase == "weights" else calibrate.calibrate_activations(qm, data, "mse")
    r = perf.reconstruction_rate(q, data, iters=cfg.recon_iters, batch_size=cfg.recon_batch,
                                 num_blocks=cfg.recon_blocks, phase=phase)
    out[f"{name} ({phase})"] = {"phase": phase, **r}
  return out


def bench_sampling(cfg, name: str) -> tuple[dict, dict]:
  import jax
  from dqjax import zoo
  from dqjax.benchmark import perf
  entry = zoo.load(name)
  data = perf.zoo_calibration_data(entry, 8, cfg.calib_steps, cfg.seed)
  key = jax.random.key(cfg.seed + 7)
  x = jax.random.normal(key, (cfg.sample_batch,) + tuple(entry.sample_shape))
  cond, _ = entry.eval_conditioning(key, cfg.sample_batch)
  fns, info, mem = {}, {}, {}
  for mode in cfg.sample_modes:
    qm = perf.calibrated_for_mode(entry, mode, data)
    f, state = perf.sampler_for_mode(entry, qm, mode)
    compiled, inf = perf.compile_timed(f, state, x, cond, key)
    fns[mode] = (lambda compiled=compiled, state=state: compiled(state, x, cond, key))
    info[mode] = inf
    mem[mode] = {"peak": inf["memory"]}
    if mode.startswith("deploy"):
      mem[mode].update(perf.weight_bytes(qm))
  for f in fns.values():      # warm-up
    perf.block(f())
  runs = {m: perf.Timing([], [], []) for m in fns}
  for _ in range(cfg.repeats):
    for m, f in fns.items():  # modes in alternation
      _, w, c, l = perf.time_call(f)
      runs[m].wall.append(w)
      runs[m].cpu.append(c)
      runs[m].load.append(l)
  out = {}
  for m in fns:
    out[m] = {"trace_lower_s": info[m]["trace_lower_s"], "compile_s": info[m]["compile_s"],
              "run": runs[m].to_dict()}
    if "fp" in runs:
      out[m]["over_fp"] = perf.ratio(runs[m], runs["fp"])
      out[m]["over_fp_wall"] = perf.ratio(runs[m], runs["fp"], cpu=False)
  return out, mem


def bench_scaling(cfg) -> dict:
  import jax.numpy as jnp
  from dqjax import zoo
  from dqjax.benchmark import perf
  out = {}
  kw = dict(num_candidates=cfg.num_candidates)

  def timed(qm, data):
    perf.block(perf.jitted_calibration(qm, data, **kw).qstate)     # compile
    return perf.measure(lambda: perf.jitted_calibration(qm, data, **kw).qstate, repeats=cfg.scale_repeats,
                        warmup=0)

  entry = zoo.load(cfg.scale_model)
  qm = perf.zoo_qmodel(entry)
  full = perf.zoo_calibration_data(entry, max(cfg.scale_samples), cfg.scale_steps, cfg.seed)
  xs, cpu, wall, load = [], [], [], []
  for n in cfg.scale_samples:
    data = full.replace(xs=full.xs[:, :n], conds=None if full.conds is None else full.conds[:, :n])
    t = timed(qm, data)
    xs.append(int(data.num_samples))
    cpu.append(t.cpu_median)
    wall.append(t.median)
    load.append(t.load[0])
  out["samples"] = {"x": xs, "cpu": cpu, "wall": wall, "load": load, "fit_cpu": perf.linear_fit(xs, cpu),
                    "what": f"{cfg.scale_model}, {cfg.scale_steps} steps, warm calls"}
  xs, cpu, wall, load, nparams = [], [], [], [], []
  for width in cfg.scale_widths:
    model = perf.width_unet(width)
    shape = (8, 8, 4)
    params = perf.random_params(model, (jnp.zeros((1,) + shape), jnp.zeros((1,)), None), seed=cfg.seed)
    qm_w, data = perf.synthetic_problem(model, params, shape, num_samples=cfg.scale_width_samples,
                                        num_steps=cfg.scale_steps, seed=cfg.seed)
    t = timed(qm_w, data)
    xs.append(int(width))
    cpu.append(t.cpu_median)
    wall.append(t.median)
    load.append(t.load[0])
    nparams.append(int(sum(a.size for a in __import__("jax").tree_util.tree_leaves(params))))
  out["width"] = {"x": xs, "cpu": cpu, "wall": wall, "load": load, "params": nparams,
                  "fit_cpu": perf.linear_fit(xs, cpu),
                  "what": f"random-parameter latent UNet (w, 2w), {cfg.scale_width_samples} samples × "
                          f"{cfg.scale_steps} steps, warm calls; parameters {nparams}"}
  return out


def bench_sharding(cfg) -> dict:
  """Run the sharded measurements in a subprocess with 8 fake CPU devices."""
  args = {"model": cfg.shard_model, "samples": cfg.shard_samples, "steps": cfg.calib_steps,
          "num_candidates": cfg.num_candidates, "devices": cfg.shard_devices, "seed": cfg.seed,
          "repeats": cfg.repeats}
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={cfg.shard_devices}").strip()
  proc = subprocess.run([sys.executable, "-m", "experiments.perf", f"--sharded_worker={json.dumps(args)}"],
                        env=env, capture_output=True, text=True, timeout=cfg.shard_timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"sharded worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def sharded_worker(args: dict) -> dict:
  """Same calibration and sampling on 1 device and sharded over `devices` (batch axis)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from dqjax import zoo
  from dqjax.benchmark import perf
  devs = jax.devices()
  if len(devs) < args["devices"]:
    raise RuntimeError(f"expected {args['devices']} devices, found {len(devs)}")
  mesh = Mesh(np.array(devs[:args["devices"]]), ("data",))
  entry = zoo.load(args["model"])
  data = perf.zoo_calibration_data(entry, args["samples"], args["steps"], args["seed"])
  qm = perf.zoo_qmodel(entry)
  kw = dict(num_candidates=args["num_candidates"])
  shard = lambda a, spec: None if a is None else jax.device_put(a, NamedSharding(mesh, spec))
  data8 = data.replace(xs=shard(data.xs, P(None, "data")),
                       conds=shard(data.conds, P(None, "data")) if data.conds is not None else None)
  one = lambda: perf.jitted_calibration(qm, data, **kw)
  eight = lambda: perf.jitted_calibration(qm, data8, **kw)
  c1, c8 = perf.block(one()), perf.block(eight())
  t1, t8 = perf.measure_pair(lambda: one().qstate, lambda: eight().qstate, repeats=args["repeats"], warmup=0)
  la = jax.tree_util.tree_leaves(c1.qstate)
  lb = jax.tree_util.tree_leaves(c8.qstate)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(a)), 1e-6)))
           for a, b in zip(la, lb) if np.asarray(a).size]
  exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(la, lb))
  # sampling: the simulated W8A8 sampler with the noise batch sharded
  n = data.num_samples if entry.guidance_scale == 1.0 or entry.cond_kind == "none" else data.num_samples // 2
  key = jax.random.key(args["seed"] + 3)
  x = jax.random.normal(key, (n,) + tuple(entry.sample_shape))
  cond, _ = entry.eval_conditioning(key, n)
  f, state = perf.sampler_for_mode(entry, c1, "sim-W8A8")
  jf = jax.jit(f)
  x8, cond8 = shard(x, P("data")), None if cond is None else jax.tree_util.tree_map(lambda a: shard(a, P("data")), cond)
  o1, o8 = perf.block(jf(state, x, cond, key)), perf.block(jf(state, x8, cond8, key))
  s1, s8 = perf.measure_pair(lambda: jf(state, x, cond, key), lambda: jf(state, x8, cond8, key),
                             repeats=args["repeats"], warmup=0)
  return {"devices": args["devices"], "model": args["model"], "calib_samples": data.num_samples,
          "calib_steps": data.num_steps, "qparams_identical": bool(exact),
          "qparams_max_rel_diff": max(diffs) if diffs else 0.0, "calib_1dev_s": t1.median,
          "calib_8dev_s": t8.median, "calib_1dev_cpu_s": t1.cpu_median, "calib_8dev_cpu_s": t8.cpu_median,
          "calib_samples_per_s_1dev": data.num_samples * data.num_steps / t1.median,
          "calib_samples_per_s_8dev": data.num_samples * data.num_steps / t8.median,
          "sample_batch": n, "sample_max_abs_diff": float(np.max(np.abs(np.asarray(o1) - np.asarray(o8)))),
          "sample_1dev_s": s1.median, "sample_8dev_s": s8.median,
          "images_per_s_1dev": n / s1.median, "images_per_s_8dev": n / s8.median,
          "output_sharding": str(o8.sharding.spec) if hasattr(o8.sharding, "spec") else str(o8.sharding)}


# --- ratios ----------------------------------------------------------------------------------------------
def compute_ratios(results: dict) -> dict:
  from dqjax.benchmark.perf import Ratio
  r = {}
  for name, c in results.get("calibration", {}).items():
    r[f"calib_speedup_cold/{name}"] = Ratio(c["speedup_cold"], "higher", "eager / compiled (cold), CPU")
    r[f"calib_speedup_warm/{name}"] = Ratio(c["speedup_warm"], "higher", "eager / compiled (warm), CPU")
  for name, by in results.get("sampling", {}).items():
    for mode, s in by.items():
      if mode != "fp" and "over_fp" in s:
        r[f"sample_over_fp/{name}/{mode}"] = Ratio(s["over_fp"], "lower", "sampling time / FP, CPU")
  for name, by in results.get("memory", {}).items():
    for mode, m in by.items():
      if "codes_ratio" in m:
        r[f"weight_compression/{name}/{mode}"] = Ratio(m["codes_ratio"], "higher", "fp32 / code bytes")
  for name, rec in results.get("reconstruction", {}).items():
    pass  # absolute rates only: no dimensionless reference to compare against
  sh = results.get("sharding")
  if sh:
    r["sharded_qparams_max_rel_diff_ok"] = Ratio(float(sh["qparams_max_rel_diff"] <= 1e-5), "higher",
                                                 "1 = 8-device parameters equal 1-device ones")
  return r


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(sharded_worker(json.loads(_WORKER.value))))
    return 0
  import jax
  from dqjax.benchmark import perf
  cfg = _CONFIG.value
  start = time.perf_counter()
  results = {"config": cfg.config_path, "machine": perf.machine_info(), "notes": list(cfg.notes),
             "sampling_batch": cfg.sample_batch, "tolerance": cfg.tolerance,
             "optimisations": list(cfg.optimisations)}
  bench = set(cfg.benchmarks)
  from dqjax.zoo import entry as zoo_entry
  have = lambda n: os.path.isdir(zoo_entry.weights_dir(n))
  if "calibration" in bench:
    results["calibration"] = {n: bench_calibration(cfg, n) for n in cfg.calib_models if have(n)}
  if "reconstruction" in bench:
    results["reconstruction"] = {}
    for n in cfg.recon_models:
      if have(n):
        results["reconstruction"].update(bench_reconstruction(cfg, n))
  if "sampling" in bench or "memory" in bench:
    results["sampling"], results["memory"] = {}, {}
    for n in cfg.sample_models:
      if have(n):
        results["sampling"][n], results["memory"][n] = bench_sampling(cfg, n)
  if "scaling" in bench:
    results["scaling"] = bench_scaling(cfg)
  if "sharding" in bench:
    results["sharding"] = bench_sharding(cfg)
  results["wall_s"] = time.perf_counter() - start
  results["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
  ratios = compute_ratios(results)
  results["ratios"] = ratios
  if _CHECK.value:
    return perf.check_against(ratios, cfg.ratio_file, cfg.tolerance)
  md = perf.write_report(results, cfg.out_dir)
  perf.save_ratios(cfg.ratio_file, ratios, {"config": cfg.config_path, "date": results["machine"]["date"],
                                            "load_average": results["machine"]["load_average"]})
  with open(os.path.join(cfg.out_dir, "perf", "results.json"), "w") as f:
    json.dump({k: v for k, v in results.items() if k != "ratios"}, f, indent=1, default=str)
  print(open(md).read())
  print(f"wrote {md} and {cfg.ratio_file} in {results['wall_s']:.0f} s")
  del jax
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
