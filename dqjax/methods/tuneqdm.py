"""TuneQDM = "Memory-Efficient Fine-Tuning for Quantized Diffusion Model" (Ryu et al., ECCV 2024;
arXiv 2401.04339; code ugonfor/TuneQDM).

Implemented (code: `tuneqdm/core.py`):
- weight-only quantization of every conv/linear: per-output-channel asymmetric min-max; the integer weights
  and zero points are frozen, W = (W_int − z) ⊙ δ_out[i] ⊙ δ_in[i] with δ_out [out] initialised to the channel
  scale and δ_in [in] to 1 (the separable "multi-channel-wise" scale update);
- timestep-aware scale update: N expert copies of (δ_out, δ_in), expert i = ⌊t·N/T⌋ selected by the
  timestep inside the compiled forward (`OpState.extra['tuneqdm']`, see `dqjax.transform.hooks`);
- only the scales train (no weights, no LoRA): the memory-efficient part.

Deviations (paper values in `configs/methods/tuneqdm.py`):
- δ_out trains in relative form, δ_out = s_c ⊙ r_out with r_out initialised to 1 (s_c: the frozen min-max
  channel scale): Adam's steps are about `lr` in size whatever the parameter's magnitude, so an absolute
  δ_out (≈ 0.004 at 8 bits, ≈ 0.07 at 4 bits) moved by tens of percent at 8 bits and collapsed the W8A8
  rows (ldm-mnist FID 46.8, dit-mnist 46.5); in relative form one learning rate means the same at every
  bit width and layer (δ_in already starts at 1);
- the paper fine-tunes for a new subject (DreamBooth, noise-prediction loss, 400 steps at lr 3e-6); here the
  task is to recover the FP model, so the loss is the ε-MSE to the FP teacher along teacher-forced FP
  trajectories (one timestep per batch, as the expert choice needs), at learning rates sized for a few
  hundred CPU steps: 3e-4 on the relative scales, 1e-5 on the activation step sizes. Adam moves every
  parameter by about lr per step whatever its gradient, so from a near-lossless 8-bit start larger rates
  random-walk the quantizers away from it (64-sample check, paired PSNR vs FP at W8A8: dit-mnist 19.0 dB at
  1e-3 / 1e-4, 29.8 dB at 3e-4 / 1e-5; ldm-mnist seeds 0–2 17–24 dB → 25.6–35.5 dB, untrained start 34.2),
  and the smaller rates also win at W4A8 (dit-mnist 19.1 → 21.3 dB, ldm-mnist 16.2 → 17.1 dB). At 8 bits
  the outcome still depends on the seed (the pool and batch order), and some seeds end below the start;
- at settings with quantized activations (A < 16) the activations get per-tensor quantizers with one entry
  per expert's timestep range (a 'groups' table), MSE-initialised and trained with the scales (the paper is
  weight-only).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate, distill
from dqjax.methods import _qat
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import lowbit
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform import hooks
from dqjax.transform.rules import Rule

NAME = "tuneqdm"


def rules_fn(config):
  def rules(w_bits, a_bits, model_family="unet"):
    return [Rule(".*", act=_qat.act_spec(a_bits), kinds=("matmul",)),
            Rule(".*", weight=_qat.weight_spec(w_bits, symmetric=False), act=_qat.act_spec(a_bits))]
  return rules


def expert_index(num_experts: int, num_train_timesteps: int) -> np.ndarray:
  """i = ⌊t·N/T⌋ for every training timestep t (clipped to N − 1)."""
  t = np.arange(num_train_timesteps)
  return np.minimum(t * num_experts // num_train_timesteps, num_experts - 1).astype(np.int32)


def add_experts(qm, num_experts: int):
  """Freeze W_int − z and the channel scale s_c of every weight-quantized op and attach N expert tables of
  relative scales (r_out, δ_in), both starting at 1: W = (W_int − z) ⊙ s_c ⊙ r_out ⊙ δ_in."""
  index = jnp.asarray(expert_index(num_experts, qm.num_train_timesteps))
  qstate = dict(qm.qstate)
  for op in qm.plan.ops:
    if op.weight is None:
      continue
    if op.weight.format != "int" or op.weight.granularity != "channel":
      raise ValueError(f"TuneQDM needs per-channel int weights; op {op.path!r} has {op.weight.short()}")
    st = qstate[op.path]
    kernel = qapply.effective_kernel(qapply.get_kernel(qm.params, op.path), st)
    codes = lowbit.centred_codes(kernel, st.weight, op.weight)
    scale = jnp.broadcast_to(st.weight.scale, (1,) * (kernel.ndim - 1) + (kernel.shape[-1],)).astype(jnp.float32)
    d_in = jnp.ones((1,) * (kernel.ndim - 2) + (kernel.shape[-2], 1), jnp.float32)
    extra = dict(st.extra)
    extra["tuneqdm"] = {"codes": codes, "scale": scale,
                        "d_out": jnp.ones((num_experts,) + scale.shape, jnp.float32),
                        "d_in": jnp.repeat(d_in[None], num_experts, 0),
                        "index": index}
    qstate[op.path] = st.replace(extra=extra)
  return hooks.as_qat_model(qm.replace(qstate=qstate))


def passes(config):
  def run(qm, data):
    cfg = _qat.distill_config(config, steps=200, batch_size=8, pool_size=64, order="trajectory")
    if cfg.order in ("random", "forward") and not cfg.same_timestep:
      cfg = dataclasses.replace(cfg, same_timestep=True)
    n = int(_qat.get(config, "num_experts", 4))
    pool, cdata = _qat.trajectories(qm, data, cfg.pool_size, cfg.seed)
    qm = calibrate.calibrate_weights(qm, "minmax")
    bounds = tuple(int(b) for b in np.unique(np.nonzero(np.diff(expert_index(n, qm.num_train_timesteps)))[0] + 1))
    table = tables.TableSpec("groups", bounds) if bounds else tables.TableSpec()
    qm = _qat.calibrate_acts(qm, cdata, _qat.get(config, "act_init", "mse"), table, p=2.4)
    qm = add_experts(qm, n)
    sel = ["d_out", "d_in"] if _qat.get(config, "train_delta_in", True) else ["d_out"]
    groups = [distill.Group("scales", float(_qat.get(config, "lr", 3e-4)), distill.extra("tuneqdm", fields=sel))]
    if _qat.get(config, "train_bias", False):
      groups.append(distill.Group("bias", float(_qat.get(config, "lr_bias", 1e-4)), distill.biases()))
    if _qat.get(config, "train_acts", True):
      groups.append(distill.Group("acts", float(_qat.get(config, "lr_act", 1e-5)), distill.act_params()))
    return distill.distill(qm, cfg, groups, pool=pool, desc=NAME)
  return run


@register(NAME, family="unet_qat/holistic", model_families=("unet", "unet_text", "dit"),
          paper="TuneQDM / MEFT (arXiv 2401.04339)")
def tuneqdm(config=None) -> Recipe:
  return Recipe(NAME, "unet_qat/holistic", rules_fn(config), passes(config),
                "frozen integer weights, trainable separable scales with timestep experts")
