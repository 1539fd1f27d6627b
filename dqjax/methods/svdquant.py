"""SVDQuant: absorbing outliers by low-rank components for 4-bit diffusion models (Li et al., ICLR 2025,
arXiv 2411.05007; calibration code mit-han-lab/deepcompressor, kernels mit-han-lab/nunchaku).

Implemented (order of deepcompressor's `ptq.py`: smooth → low-rank + weight quant → activation quant):
* **Smoothing into the weights**: per projection group (to_q/to_k/to_v share one factor), λ = s_X^α / s_W^β
  with s_X the AbsMax of the input over all calibration tokens and s_W the AbsMax of the kernel rows;
  (α, β) from the 39-candidate grid {(0,0)} ∪ {(a,0)} ∪ {(a,1−a)}, a = 1/20 … 19/20, chosen by the layer's
  output error with quantized input, quantized weight **and the low-rank branch in the loop**
  (`allow_low_rank`). λ stays an online divide (nunchaku fuses it into the activation quantize kernel).
* **Low-rank branch**: L = A·B of rank r on the smoothed weight, refined by alternation
  (L_0 = SVD_r(Ŵ), Q_k = q(Ŵ − L_k), L_{k+1} = SVD_r(Ŵ − Q_k)) scored by the output error
  ‖Q_a(X̂)·Q_k + X̂·A·B − X·W‖² on calibration inputs, best kept, early stop at the first increase; the
  branch stays float and reads the float smoothed input: Y = Q_a(X̂)·Q(Ŵ − AB) + X̂·A·B. For qkv one
  shared down-projection A and per-op rows of B (the fused-qkv branch).
* **W4A4**: weights and activations symmetric int4 in groups along the input channels (activations
  dynamic per token-group); fc2 (post-GELU) activations asymmetric, standing in for the paper's shifted
  unsigned quantization; adaLN modulation weight-only (`extra_wgts`); embedders, patch embedding, final
  layer and attention matmuls in float (the paper's skips; nunchaku runs FP16 attention). At 8-bit weights
  the groups become per-output-channel, as for W8A8 baselines.
* Deploy: `dqjax.deploy.deploy_state` stores the residual as packed int4 codes with group scales and keeps
  the (A, B) branch in the quantization state; deploy-mode outputs equal simulate-mode outputs.

Deviations: group 32 instead of 64 (64 does not divide dit-mnist's width 96); rank scaled to the model
(paper 32 for widths ≥ 1152; default 8 here); 10 alternating iterations (paper up to 100 with early stop);
the qkv smoothing error is measured on the concatenated q/k/v outputs, not on the attention output; no
GPTQ on the residual (an option in the paper's configs). The low-rank branch is not counted in the
bench's model size / BOPs (they count planned kernels only).
"""
from __future__ import annotations

import jax.numpy as jnp

from dqjax.calib import smoothing as sm
from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant.spec import QuantSpec

FAMILY = "dit_ptq/channel_equalization"


def _groups(qm):
  family = qm.meta.get("model_family", "dit")
  return sm.dit_groups(qm.plan) if family == "dit" else sm.generic_groups(qm.plan)


def smooth_pass(*, num_grids: int = 20, rank: int = 8, samples_per_step: int = 8, max_rows: int = 4096,
                seed: int = 0):
  def run(qm, data):
    qm, chosen = sm.searched_smoothing(qm, data, _groups(qm), sm.svdquant_grid(num_grids),
                                       lowrank_rank=rank, samples_per_step=samples_per_step,
                                       max_rows=max_rows, seed=seed)
    return qm.replace(meta={**qm.meta, "svdquant_alpha_beta": chosen})
  return run


def lowrank_pass(*, rank: int = 8, iters: int = 10, samples_per_step: int = 8, max_rows: int = 2048,
                 seed: int = 0):
  """Alternating low-rank branch per group, scored by the group's output error on calibration inputs."""
  def run(qm, data):
    if rank <= 0:
      return qm
    groups = [g for g in _groups(qm) if all(sm.kernel_of(qm, p).ndim == 2 for p in g.paths)]
    if not groups:
      return qm
    rows = sm.capture_rows(qm, data, [g.paths[0] for g in groups], samples_per_step=samples_per_step,
                           max_rows=max_rows, seed=seed)   # smoothed (transformed) float inputs X̂
    scores = {}
    for g in groups:
      op = qm.plan[g.paths[0]]
      w_spec, a_spec = op.weight, op.act_spec("input")
      xh = rows[g.paths[0]]
      w_hat = sm.group_kernel(qm, g)
      ref = xh @ w_hat
      xq = sm.quantize_rows(xh, a_spec)

      def score(a, b, q, xh=xh, xq=xq, ref=ref):
        return jnp.sum((xq @ q + (xh @ a) @ b - ref) ** 2)

      qm, sc = sm.set_group_lowrank(qm, g, rank, lambda w, s=w_spec: sm.quantize_weight(w, s), iters=iters,
                                    score_fn=score, early_stop=True)
      scores[g.name] = sc
    return qm.replace(meta={**qm.meta, "svdquant_lowrank_scores": scores})
  return run


def _rules(config):
  def rules(w_bits, a_bits, model_family="dit"):
    g = common.config_get(config, "group_size", 32)
    if w_bits <= 4 and g:
      w = QuantSpec("int", w_bits, symmetric=True, granularity="group", axis=-2, group_size=g)
    else:
      w = QuantSpec("int", w_bits, symmetric=True, granularity="channel", axis=-1)
    a = fc2 = None
    if a_bits < 16:
      if a_bits <= 4 and g:
        a = QuantSpec("int", a_bits, symmetric=True, granularity="group", axis=-1, group_size=g, dynamic=True)
      else:
        a = QuantSpec("int", a_bits, symmetric=True, granularity="token", axis=-1)
      fc2 = a.replace(symmetric=False)
    keep = sm.skip_patterns(model_family, tuple(common.config_get(config, "keep_fp",
                                                                  ("embed", "first_last"))))
    if model_family != "dit":
      keep = keep + (r".*(proj_in|proj_out|upsamplers_\d+/conv|downsamplers_\d+/conv|conv_shortcut)",)
    weight_only = (sm.SKIP[model_family]["adaln"],) if common.config_get(config, "adaln_weight_only", True) \
        and model_family == "dit" else ()
    return sm.build_rules(w, a, keep_fp=keep, weight_only=weight_only,
                          act_overrides=((r".*ff/net_2", fc2),) if fc2 is not None else ())
  return rules


@register("svdquant", family=FAMILY, model_families=("dit", "unet_text"),
          paper="SVDQuant (Li et al., ICLR 2025, arXiv 2411.05007)")
def svdquant(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rank = int(get("rank", 8))
  kw = dict(samples_per_step=get("search_samples_per_step", 8), seed=get("seed", 0))
  return Recipe("svdquant", FAMILY, _rules(config), chain(
      sm.fit_groups_pass(),
      smooth_pass(num_grids=get("num_grids", 20), rank=rank if get("lowrank_in_search", True) else 0,
                  max_rows=get("search_rows", 4096), **kw),
      lowrank_pass(rank=rank, iters=get("lowrank_iters", 10), max_rows=get("lowrank_rows", 2048), **kw),
      common.calibrate_weights_pass("minmax"),
  ), "smoothing (α, β grid, low-rank-aware) + rank-r float SVD branch + 4-bit residual, W4A4 g32")
