r"""Demo of the quantization core on a small Flax conv net (no diffusion model needed).

Quantizes the net with rules to W8A8 and W4A8 in simulate and deploy mode and prints the plan table, the
output error against FP, the weight bytes of each mode and the time of the jitted calibration.

  python -m experiments.demo_core
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app

from dqjax import deploy
from dqjax.calib import calibrate
from dqjax.calib.data import CalibData
from dqjax.methods import recipe
from dqjax.methods.common import standard_rules


class DemoNet(nn.Module):
  """A small conv net with the denoiser call signature (x, t, cond); t is unused."""

  @nn.compact
  def __call__(self, x, t, cond=None):
    h = nn.silu(nn.Conv(32, (3, 3), name="conv_in")(x))
    h = nn.silu(nn.Conv(64, (3, 3), strides=2, name="conv_1")(h))
    h = nn.silu(nn.Conv(64, (3, 3), name="conv_2")(h))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.silu(nn.Dense(128, name="dense_1")(h))
    return nn.Dense(10, name="head")(h)


def run(num_steps: int = 4, samples: int = 64) -> dict:
  model = DemoNet()
  key = jax.random.key(0)
  x = jax.random.normal(key, (samples, 16, 16, 3))
  t = jnp.zeros((samples,))
  params = model.init(jax.random.key(1), x[:2], t[:2])["params"]
  data = CalibData(jax.random.normal(jax.random.key(2), (num_steps, samples, 16, 16, 3)),
                   jnp.zeros((num_steps,)))
  fp = model.apply({"params": params}, x, t)
  results = {}
  for w_bits, a_bits in ((8, 8), (4, 8)):
    qm = recipe.prepare(model, params, standard_rules(w_bits, a_bits), (x[:2], t[:2]))
    start = time.perf_counter()
    qm = calibrate.calibrate_weights(qm, "mse")
    qm = calibrate.calibrate_activations(qm, data, "mse")
    jax.block_until_ready(jax.tree_util.tree_leaves(qm.qstate))
    calib_s = time.perf_counter() - start
    sim = jax.jit(lambda x, t: qm.apply(x, t))(x, t)
    stripped, deployed = deploy.deploy_state(qm.plan, qm.params, qm.qstate)
    dep = jax.jit(lambda p, d, x, t: qm.replace(params=p).apply(x, t, mode="deploy", deployed=d))(
        stripped, deployed, x, t)
    rel = lambda o: float(jnp.linalg.norm(o - fp) / jnp.linalg.norm(fp))
    # Weight bytes: the kernels of the quantized ops (fp32) versus their codes + scales (biases excluded,
    # they stay float in both modes).
    sizes = deploy.kernel_bytes(qm.plan, params, deployed)
    results[f"W{w_bits}A{a_bits}"] = dict(
        plan=qm.plan.table(), calib_seconds=calib_s, rel_error_simulate=rel(sim), rel_error_deploy=rel(dep),
        deploy_vs_simulate=float(jnp.max(jnp.abs(dep - sim))), fp32_weight_bytes=sizes["fp32"],
        deploy_weight_bytes=sizes["codes"] + sizes["scales"],
        compression=sizes["fp32"] / (sizes["codes"] + sizes["scales"]))
  return results


def main(_):
  results = run()
  print(results["W8A8"]["plan"])
  print()
  print("| setting | rel. error simulate | rel. error deploy | max |deploy−simulate| | weight bytes fp32 → "
        "deploy | compression | calibration s |")
  print("|---|---|---|---|---|---|---|")
  for k, r in results.items():
    print(f"| {k} | {r['rel_error_simulate']:.4f} | {r['rel_error_deploy']:.4f} | {r['deploy_vs_simulate']:.2e}"
          f" | {r['fp32_weight_bytes']:,} → {r['deploy_weight_bytes']:,} | {r['compression']:.2f}× "
          f"| {r['calib_seconds']:.2f} |")


if __name__ == "__main__":
  app.run(main)
