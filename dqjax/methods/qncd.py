"""QNCD: Quantization Noise Correction for Diffusion Models (Chu et al., ACM MM 2024; arXiv 2403.19140;
huanpengchu/QNCD).

Implemented (following `quant/quant_block.py::QuantResBlock.{save_temb, set_conv_weight}` and
`ldm/models/diffusion/plms.py` of the public code):
- intra-step noise — embedding-derived feature smoothing: in every ResBlock the time-embedding projection
  `emb_out = time_emb_proj(silu(temb))` is added to the features before `norm2`. Over the calibration set we
  take GroupNorm-without-affine of `emb_out` (norm2's groups and eps), clamp it below at 1, average it over
  samples, clamp again at 1 and multiply by norm2's γ: s_c. The activation after norm2+SiLU is divided by s
  at run time and conv2's kernel rows multiplied by s (`param_transforms.smooth`: the float function is
  unchanged, the quantized input has a narrower per-channel range). Done before calibrating;
- inter-step noise — estimation and filtering: every `interval` steps the quantized model's noise is probed by
  re-noising the next state back to the current timestep, x_re = √r x_prev + √(1 − r) ε (r = ᾱ_t/ᾱ_prev), and
  taking μ_q = mean(ε_q(x_re, t) − ε); μ_q is subtracted from ε at that step and at every step until the next
  estimate (the code computes σ_q too and then zeroes it: not used, `use_std=False`);
- base quantizer as the code's `qncd` mode: symmetric per-channel max weights, Lp-searched activations, the
  attention matmuls quantized; `emb_float` keeps the time embedding in float (the code's `--emb_float`).

Deliberate deviations: the inter-step estimate is computed offline on `stats_samples` quantized trajectories
from fresh noise (a per-step table) instead of at run time on the batch being sampled: the sampler hook sees
neither the model nor the conditioning, and the table spares the extra network call every `interval` steps —
the runtime estimate is itself one scalar per batch, so the two differ only by sampling noise; estimates are
taken at the steps i ≡ interval//2 (mod interval) of every sampler (the code: PLMS only, and its CIFAR DDIM
path lacks it); the smoothing factor averages over every calibration sample (the code keeps the first
sample's slice of the batch mean) and its magnitude is floored at `min_factor`·max|s| (a γ near zero would
otherwise blow the divided activation up).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from dqjax.calib import noise_stats as ns
from dqjax.methods import common
from dqjax.methods._act_extra import observe_steps
from dqjax.methods._correction import affine_correction, attach, base_passes, base_rules, stats_samples, stats_seed
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.transform import apply as qapply
from dqjax.transform import param_transforms

EMB_PROJ = r"(.+)/time_emb_proj"


def resblocks(qm) -> list[str]:
  """Prefixes of the ResBlocks with a time-embedding projection and a conv2 (e.g. 'down_blocks_0/resnets_0')."""
  out = []
  for op in qm.plan.ops:
    m = re.fullmatch(EMB_PROJ, op.path)
    if m and f"{m.group(1)}/conv2" in qm.plan:
      out.append(m.group(1))
  return out


def _gn_noaffine(e, groups: int, eps: float):
  b, c = e.shape
  g = e.reshape(b, groups, c // groups)
  mu = jnp.mean(g, -1, keepdims=True)
  var = jnp.mean((g - mu) ** 2, -1, keepdims=True)
  return ((g - mu) / jnp.sqrt(var + eps)).reshape(b, c)


def embedding_factors(qm, data, *, groups: int, eps: float = 1e-5, min_factor: float = 1e-2) -> dict[str, jax.Array]:
  """{ResBlock prefix: s [C]} (see the module docstring)."""
  blocks = resblocks(qm)
  proj = {f"{b}/time_emb_proj": b for b in blocks}
  flat = {p: (qapply.get_kernel(qm.params, p), _bias(qm.params, p)) for p in proj}

  def make(t):
    def stat_fn(op, operand, x):
      if op.path not in flat or operand != "input":
        return None
      k, bias = flat[op.path]
      emb = x.reshape(-1, x.shape[-1]) @ k + (0.0 if bias is None else bias)
      s = jnp.maximum(_gn_noaffine(emb, groups, eps), 1.0)
      return {"s": (jnp.sum(s, 0), jnp.asarray(s.shape[0], jnp.float32))}
    return stat_fn

  stats = observe_steps(qm, data, make, lambda a, b: (a[0] + b[0], a[1] + b[1]))
  out = {}
  for path, block in proj.items():
    tot, cnt = stats[path]["s"]
    mean = jnp.maximum(jnp.sum(tot, 0) / jnp.sum(cnt), 1.0)
    gamma = _norm_scale(qm.params, f"{block}/norm2")
    s = gamma * mean
    floor = min_factor * jnp.max(jnp.abs(s))
    out[block] = jnp.where(jnp.abs(s) < floor, jnp.where(s < 0, -floor, floor), s)
  return out


def _bias(params, path):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node.get("bias")


def _norm_scale(params, path):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node["scale"]


def smoothing_pass(config):
  """Pass: fold the embedding-derived factors into every ResBlock's conv2 (before calibration)."""
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    if not get("intra", True):
      return qm
    groups = int(get("norm_groups", 0)) or _groups_of(qm)
    factors = embedding_factors(qm, data, groups=groups, eps=float(get("norm_eps", _eps_of(qm))),
                                min_factor=float(get("min_factor", 1e-2)))
    for block, s in factors.items():
      qm = param_transforms.smooth(qm, f"{block}/conv2", s)
    return qm.replace(meta={**qm.meta, "qncd_smoothed": sorted(factors)})

  return run


def _groups_of(qm) -> int:
  cfg = getattr(qm.model, "config", None)
  g = getattr(cfg, "norm_num_groups", None)
  if g is None:
    raise ValueError("QNCD needs the ResBlocks' GroupNorm group count: set config field norm_groups")
  return int(g)


def _eps_of(qm) -> float:
  return float(getattr(getattr(qm.model, "config", None), "norm_eps", 1e-5))


def renoise_means(qm, *, num_samples: int, seed: int, denoise_q=None) -> tuple[np.ndarray, np.ndarray]:
  """[S]: μ_q of every call from re-noising the quantized trajectory's next state back to the call's t
  (NaN where the next state has the same noise level, e.g. PLMS's repeated timestep)."""
  env = ns._require_env(qm)
  denoise_q = denoise_q or qm.denoiser()
  x, conds, key = ns.initial_state(qm, num_samples, seed)
  out = ns.sample_fn(qm, denoise_q)(x, conds, key)
  xs, ts = out.trajectory.xs, out.trajectory.ts
  nxt = jnp.concatenate([xs[1:], out.x0[None]], 0)
  ac = np.asarray(env.schedule.alphas_cumprod, np.float64)
  tsi = np.asarray(ts).astype(int)
  final = 1.0 if ns._plain_sampler(env.sampler).final_alpha_one else ac[0]
  a_t = ac[tsi]
  a_next = np.concatenate([ac[tsi[1:]], [final]])
  r = a_t / a_next
  valid = r < 1.0 - 1e-7
  r = np.where(valid, r, 0.5)
  noise = jax.random.normal(jax.random.fold_in(key, 7), xs.shape)
  rr = jnp.asarray(r, jnp.float32).reshape((-1,) + (1,) * (xs.ndim - 1))
  x_re = jnp.sqrt(rr) * nxt + jnp.sqrt(1.0 - rr) * noise
  eps = ns.eps_fn(qm, denoise_q)(x_re, ts, conds)
  mu = np.asarray(jnp.mean(eps - noise, axis=tuple(range(1, xs.ndim))))
  return np.where(valid, mu, np.nan), np.asarray(ts)


def held_estimates(mu: np.ndarray, interval: int) -> np.ndarray:
  """[S]: the estimate of the latest estimation step (i ≡ interval//2 mod interval, valid) at or before each
  step; 0 before the first."""
  out = np.zeros(len(mu), np.float32)
  cur = 0.0
  for i, m in enumerate(mu):
    if i % interval == interval // 2 and np.isfinite(m):
      cur = float(m)
    out[i] = cur
  return out


def correction_pass(config):
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data):
    if not get("inter", True) or qm.env is None:
      return qm
    mu, ts = renoise_means(qm, num_samples=stats_samples(config), seed=stats_seed(config, qm))
    shift = held_estimates(mu, max(1, int(get("interval", 10))))
    corr = affine_correction("qncd", ts, shift=-shift)
    return attach(qm, corr, qncd={"mu": np.nan_to_num(mu).tolist(), "applied": shift.tolist()})

  return run


@register("qncd", family="unet_ptq/error_correction", model_families=("unet", "unet_text"),
          paper="QNCD (arXiv 2403.19140)")
def qncd(config=None) -> Recipe:
  keep = (r"time_embedding/.*", r".*time_emb_proj") if common.config_get(config, "emb_float", False) else ()
  rules = base_rules(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True, keep_fp=keep)
  return Recipe("qncd", "unet_ptq/error_correction", rules,
                chain(smoothing_pass(config), *base_passes(config, weight_init="minmax"), correction_pass(config)),
                "embedding-derived channel smoothing folded into conv2 (intra-step) and a re-noising estimate "
                "of the quantized model's mean noise subtracted in the sampler (inter-step)")
