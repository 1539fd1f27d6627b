"""EDA-DM: Enhanced Distribution Alignment for Post-Training Quantization of Diffusion Models (Liu et al.;
arXiv 2401.04585; BienLuky/EDA-DM).

Implemented, following the public code (scripts/calibration.py, qdiff/block_recon.py):
- TDAC (temporal distribution alignment calibration): run the FP sampler, take the input feature map of the
  middle attention block at every step (F_t, the whole batch), and weight each step by
    density   D_t = #{j != t : mean((F_t - F_j)^2) <= r}
    diversity V_t = sum_{j != t} sum(1 - cos(F_t, F_j))     (cosine over channels, summed over batch × space)
  w_t = D'_t + lambda · V'_t with min-max normalised D', V'; step t then gets round(N · w_t / sum w) samples;
- FBR (fine-grained block reconstruction): every block jointly learns its AdaRound logits and activation
  step sizes (two Adam groups with cosine decay) against
    ||B_q(x_mix) - B_fp(x_fp)||^2 + add_loss · sum over the block's Conv/Linear layers except the last of
    ||y_l^q - y_l^fp||^2,
  with QDrop: each activation element quantized with probability 0.5 and the block input mixed element-wise
  between the quantized-model input and the float input (0.5); no rounding regulariser (as the code);
- Q-Diffusion's model wrappers: input activation quantization, split shortcut quantizers, q/k/v/softmax
  quantizers (softmax 8 bits); weights per-channel, symmetric range search ('symmetric = not a_sym');
  activations per-tensor Lp(2.4)-searched; the time-embedding's first layer and conv_out at 8 bits
  (`set_first_last_layer_to_8bit`). One set of activation parameters for all steps (no tables), as the
  README stresses for deployability.

Deliberate deviations: CPU-sized iterations (`iters`, paper 5000 in `paper_iters`); the density radius r is
dataset-specific in the code (3.0 CIFAR, 0.3 LDM), so the default `r = None` uses the median pairwise
feature distance of the model at hand; QDrop's grid is unsigned with a zero point, our activation grid is
asymmetric with the searched range (equivalent); the EMA over calibration batches is one search over all
samples. `round_loss=True` restores AdaRound's regulariser (the notes warn that the regulariser-free soft to
hard switch can move many weights).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dqjax.calib import reconstruct as rc
from dqjax.calib.calib_sets import counts_from_weights, from_step_counts, trajectory_for
from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config, split_shortcuts_pass, with_data
from dqjax.methods.q_diffusion import recon_blocks
from dqjax.methods.recipe import Recipe, register

FEATURE_MODULE = "mid_block/attentions_0"
FBR = rc.ReconConfig(iters=100, batch_size=16, lr_w=1e-2, lr_a=1e-3, schedule_w="cosine", schedule_a="cosine",
                     round_loss=False, p=2.0, asym=True, qdrop_prob=0.5, input_prob=0.5, layer_loss=0.8,
                     num_samples=256)


def step_features(qm, traj: CalibData, module: str = FEATURE_MODULE, batch: int = 64) -> np.ndarray:
  """F_t: the float input of `module` for every sample of every step, [S, N, ...] (host)."""
  fn, _ = rc.capture_fn(qm.model, qm.plan, (module,), quantized=False)
  x, t, c = traj.flat()
  feats = rc._batched(lambda *a: fn(qm.fp_params, {}, *a), (x, t, c), x.shape[0], batch,
                      pick=lambda r: r[module][0])
  return feats.reshape((traj.num_steps, traj.num_samples) + feats.shape[1:])


def tdac_weights(features, *, r=None, lam: float = 1.2) -> np.ndarray:
  """EDA-DM's step weights w_t = D'_t + lam·V'_t from per-step features F [S, N, ..., C].

  r: density radius on mean squared feature distance; None = the median distance between distinct steps.
  """
  f = jnp.asarray(features, jnp.float32)
  s = f.shape[0]
  flat = f.reshape(s, -1)
  d2 = jnp.mean((flat[:, None, :] - flat[None, :, :]) ** 2, axis=-1)          # [S, S]
  off = ~np.eye(s, dtype=bool)
  d2 = np.asarray(d2)
  radius = float(np.median(d2[off])) if r is None else float(r)
  density = np.sum((d2 <= radius) & off, axis=1).astype(np.float64)
  unit = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-8)   # cosine over channels
  un = unit.reshape(s, -1, f.shape[-1])
  cos = jnp.einsum("amc,bmc->abm", un, un)                                    # [S, S, positions]
  diversity = np.asarray(jnp.sum(1.0 - cos, axis=-1))
  diversity = np.sum(np.where(off, diversity, 0.0), axis=1)

  def minmax(v):
    span = v.max() - v.min()
    return np.zeros_like(v) if span <= 0 else (v - v.min()) / span

  w = minmax(density) + lam * minmax(diversity)
  return w if w.sum() > 0 else np.ones(s)


def tdac_set(config):
  """The TDAC calibration set: N samples spread over the FP trajectory's steps by TDAC weights."""
  get = lambda k, d: common.config_get(config, k, d)

  def make(qm, data: CalibData) -> CalibData:
    traj = trajectory_for(qm, data, get("traj_samples", 64))
    feats = step_features(qm, traj, get("feature_module", FEATURE_MODULE))
    w = tdac_weights(feats, r=get("radius", None), lam=float(get("lam", 1.2)))
    counts = counts_from_weights(w, int(get("num_samples", 256)))
    out = from_step_counts(traj, counts, chunk=int(get("chunk", 8)), seed=int(get("seed", 0)))
    return out

  return make


@register("eda_dm", family="unet_ptq/calibration", model_families=("unet", "unet_text"),
          paper="EDA-DM (arXiv 2401.04585)")
def eda_dm(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rules = rules_from_config(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True,
                            eight_bit=(r"time_embedding/linear_1", r"conv_out"), softmax_bits=8)
  fbr = rc.config_from(config, "fbr_", FBR).replace(iters=get("iters", FBR.iters))
  passes = [split_shortcuts_pass(bool(get("split_shortcut", True))),
            common.calibrate_weights_pass(get("weight_init", "mse"), p=2.4),
            common.calibrate_activations_pass(get("act_init", "mse"), p=2.4, batch_size=get("calib_batch", None)),
            rc.reconstruction_pass(fbr, phase="joint", blocks=recon_blocks(config))]
  return Recipe("eda_dm", "unet_ptq/calibration", rules, with_data(tdac_set(config), *passes),
                "TDAC calibration set (step density + diversity of mid-block features), fine-grained block "
                "reconstruction (block + layer losses, joint AdaRound and act steps, QDrop)")
