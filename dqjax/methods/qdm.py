"""Q-DM (Li et al., NeurIPS 2023, "Q-DM: An Efficient Low-bit Quantized Diffusion Model"; no public code).

The paper diagnoses (a) the *oscillation* of activation distributions across timesteps and (b) the error
that accumulates over the denoising steps, and answers with Timestep-aware Quantization (TaQ) and
Noise-estimating Mimicking (NeM) inside quantization-aware training. Only the abstract could be read here
(the corpora hold no method section and there is no code), so the mechanisms follow the research notes'
reconstruction, marked as such:

- TaQ [reconstruction]: every quantized activation operand is standardised with the mean and standard
  deviation of its own timestep, x̃ = (x − μ_t)/σ_t, quantized by one LSQ quantizer shared by all timesteps
  (symmetric, per tensor, learnable step), and de-standardised; μ_t, σ_t come from the FP model's trajectories
  (a per-step table, `OpState.extra['taq']`, looked up inside the compiled sampler). The oscillating range is
  thereby removed before the quantizer sees it.
- NeM: the quantized network mimics the FP network's noise estimate, ‖ε_FP(x_t, t) − ε_Q(x_t, t)‖², added to
  the ordinary ε-prediction loss of QAT.
- QAT: LSQ on weights (per-channel symmetric step) and activations, latent float weights trained through the
  straight-through rounding, Adam.

Deviations: data-free (x₀ from the FP model's own samples instead of the training set, then x_t = q_sample);
CPU-sized training (a few hundred updates; the paper trains like the full-precision model); the first and last
layers keep 8 bits (a common QAT choice; configurable).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate, distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform.rules import Rule
from dqjax.transform.state import ActQuant

NAME = "qdm"


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    fl = _qat.get(config, "first_last_bits", 8)
    a = _qat.act_spec(a_bits, symmetric=True)
    out = []
    if fl is not None:
      out.append(Rule(f"({_qat.TIME_EMBED})|({_qat.FIRST_LAST_OPS})", weight=_qat.weight_spec(int(fl)),
                      act=_qat.act_spec(int(fl), symmetric=True), kinds=("dense", "conv", "conv_transpose")))
    out.append(Rule(".*", act=a, kinds=("matmul",)))
    out.append(Rule(".*", weight=_qat.weight_spec(w_bits), act=a))
    return out
  return rules


def step_moments(qm, data, *, batch_size=None) -> dict:
  """Per-step mean and standard deviation of every statically quantized activation operand:
  {path: {operand: (mu [S], sigma [S])}}, from float forwards on the calibration data."""
  plan = qm.plan

  def stat_fn(op, operand, x):
    spec = op.act_spec(operand)
    if spec is None or spec.dynamic:
      return None
    x = x.astype(jnp.float32)
    return {operand: (jnp.sum(x), jnp.sum(x * x), jnp.float32(x.size))}

  merge = lambda a, b: tuple(u + v for u, v in zip(a, b))

  @jax.jit
  def one(params, x, t, c):
    tb = jnp.full((x.shape[0],), t)
    return qapply.observe(qm.model, plan, params, {}, stat_fn, x, tb, c, t=tb, stat_reduce=merge)

  per_step = []
  for s in range(data.num_steps):
    c = None if data.conds is None else data.conds[s]
    per_step.append(one(qm.params, data.xs[s], jnp.asarray(data.ts[s], jnp.float32), c))
  out = {}
  for path in per_step[0]:
    out[path] = {}
    for name in per_step[0][path]:
      tot = np.array([[float(v) for v in st[path][name]] for st in per_step])   # [S, 3]
      mu = tot[:, 0] / tot[:, 2]
      var = np.maximum(tot[:, 1] / tot[:, 2] - mu ** 2, 0.0)
      out[path][name] = (mu.astype(np.float32), np.sqrt(var + 1e-8).astype(np.float32))
  return out


def add_taq(qm, data, pattern: str = ".*"):
  """Attach TaQ to every statically quantized activation operand of the ops matching `pattern`: per-step
  standardisation tables and a shared LSQ quantizer initialised at 2·E|x̃|/√Qp with E|x̃| = √(2/π)."""
  moments = step_moments(qm, data)
  steps_t = np.asarray(data.ts).astype(int).tolist()
  index = jnp.asarray(tables.timestep_index(tables.TableSpec("per_step"), steps_t, qm.num_train_timesteps))
  rx = re.compile(pattern)
  qstate = dict(qm.qstate)
  for path, by in moments.items():
    if not rx.fullmatch(path):
      continue
    op = qm.plan[path]
    st = qstate[path]
    mus, sigmas = {}, {}
    for name, (mu, sigma) in by.items():
      spec = op.act_spec(name)
      mus[name], sigmas[name] = jnp.asarray(mu), jnp.asarray(sigma)
      ndim = len(op.info.input_shapes[op.info.operands.index(name)])
      scale = 2.0 * math.sqrt(2.0 / math.pi) / math.sqrt(max(spec.qmax, 1))
      st = st.replace_act(name, ActQuant(qops.QParams(jnp.full((1,) + (1,) * ndim, scale, jnp.float32))))
    extra = dict(st.extra)
    extra["taq"] = {"mu": mus, "sigma": sigmas, "index": index}
    qstate[path] = st.replace(extra=extra)
  return qm.replace(qstate=qstate)


def passes(config):
  def run(qm, data):
    from dqjax.transform import hooks
    cfg = _qat.distill_config(config, steps=300, batch_size=8, pool_size=64, order="forward",
                              diffusion_weight=1.0, output_weight=1.0, guided=False)
    pool, cdata = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = calibrate.calibrate_weights(qm, _qat.get(config, "weight_init", "mse"), p=2.0)
    qm = hooks.as_qat_model(add_taq(qm, cdata, _qat.get(config, "taq_pattern", ".*")))
    groups = [distill.Group("weights", float(_qat.get(config, "lr_weights", 1e-5)),
                            distill.any_of(distill.kernels(), distill.biases())),
              distill.Group("scales", float(_qat.get(config, "lr_scales", 1e-3)),
                            distill.any_of(distill.weight_scales(), distill.act_params()))]
    only = {op.path for op in qm.plan.ops if op.quantized}
    groups[0] = distill.Group("weights", groups[0].lr, lambda l, s=groups[0].select: s(l) and l.module in only)
    return distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
  return run


@register(NAME, family="unet_qat/holistic", model_families=("unet", "unet_text", "dit"),
          paper="Q-DM (NeurIPS 2023)")
def qdm(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/holistic", rules_fn(config), passes(config),
                "timestep-aware quantization (per-step standardisation + LSQ) and noise-estimating mimicking QAT")
