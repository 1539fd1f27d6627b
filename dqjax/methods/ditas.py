"""DiTAS: quantizing diffusion transformers via enhanced activation smoothing (Dong & Zhang, WACV 2025,
arXiv 2409.07756; code DZY122/DiTAS).

Implemented:
* **Temporal-aggregated smoothing (TAS)**: the activation salience of every qkv / proj / fc1 / fc2 input
  is max|X_j| over all tokens, samples *and timesteps* of the FP sampling run (a running max over time),
  so one smoothing factor covers the whole trajectory.
* **Layer-wise grid search** of the smoothing strength: for α ∈ {0, 0.05, …, 1},
  λ = a_j^α / w_j^(1−α), and the α minimising the layer's output error
  ‖Q_A(X/λ)·Q_W(diag(λ)W) − X·W‖² on recorded inputs is kept, one search per layer (qkv shares one λ).
* **Training-free LoRA** for the weight-quantization error (`lora_rank` > 0): the alternating LoftQ-style
  fixed point Q = q(W − L), L = SVD_r(W − Q) for `lora_iters` iterations, kept as a float branch.
* **Re-parameterization** as `sample_merge_TAS.py`: λ of qkv/fc1 folded into the adaLN shift/scale rows,
  λ of proj into the V projection; fc2 (after GELU) divides online.
* Quantizers as the code: only qkv/proj/fc1/fc2 of the blocks (embedders, adaLN, final layer in float,
  matmuls in float); weights asymmetric, groups of 32 along the input; activations per-tensor asymmetric
  *dynamic* (min/max of the current tensor).

Deviations (documented in the config): the code quantizes W *before* smoothing and never re-quantizes
Q·diag(s) (a per-input-channel float scale on an INT4 matrix: not an INT4 GEMM operand); we smooth first
and quantize the smoothed weight, as the paper text describes. "Group of 32" is contiguous along the input
dimension (the code's groups are strided over the flattened tensor). The grid search includes the LoRA
branch as one SVD of the smoothed weight (the code includes its already-alternated LoRA). The LoRA branch
sees the float (smoothed) input, not the quantized one. LoRA rank is scaled to the model width (paper 32
for D = 1152; default 4 for D = 96).
"""
from __future__ import annotations

from dqjax.calib import smoothing as sm
from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant.spec import QuantSpec

FAMILY = "dit_ptq/channel_equalization"


def tas_search_pass(*, num_alphas: int = 21, lora_rank: int = 0, fold: bool = True, samples_per_step: int = 8,
                    max_rows: int = 4096, seed: int = 0):
  """Pass: TAS salience + per-layer α grid search, folding where exact."""
  def run(qm, data):
    groups = sm.dit_groups(qm.plan)
    qm, chosen = sm.searched_smoothing(qm, data, groups, sm.alpha_grid(num_alphas), lowrank_rank=lora_rank,
                                       fold=fold, samples_per_step=samples_per_step, max_rows=max_rows,
                                       seed=seed)
    return qm.replace(meta={**qm.meta, "ditas_alpha": {k: v[0] for k, v in chosen.items()}})
  return run


def lora_pass(rank: int, iters: int = 10):
  """Pass: DiTAS' training-free LoRA on every smoothed group (shared down-projection for qkv)."""
  def run(qm, data):
    if rank <= 0:
      return qm
    for g in sm.dit_groups(qm.plan):
      spec = qm.plan[g.paths[0]].weight
      qm, _ = sm.set_group_lowrank(qm, g, rank, lambda w, spec=spec: sm.quantize_weight(w, spec), iters=iters,
                                   early_stop=False)
    return qm
  return run


def _rules(config):
  def rules(w_bits, a_bits, model_family="dit"):
    g = common.config_get(config, "group_size", 32)
    w = QuantSpec("int", w_bits, symmetric=False, granularity="group", axis=-2, group_size=g) if g else \
        QuantSpec("int", w_bits, symmetric=False, granularity="channel", axis=-1)
    a = None if a_bits >= 16 else QuantSpec("int", a_bits, symmetric=False, granularity="tensor", dynamic=True)
    return sm.build_rules(w, a, only=sm.BLOCK_LINEARS)
  return rules


@register("ditas", family=FAMILY, model_families=("dit",),
          paper="DiTAS (Dong & Zhang, WACV 2025, arXiv 2409.07756)")
def ditas(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rank = int(get("lora_rank", 4))
  return Recipe("ditas", FAMILY, _rules(config), chain(
      sm.fit_groups_pass(),
      tas_search_pass(num_alphas=get("num_alphas", 21), lora_rank=rank, fold=get("reparam", True),
                      samples_per_step=get("search_samples_per_step", 8), max_rows=get("search_rows", 4096),
                      seed=get("seed", 0)),
      lora_pass(rank, get("lora_iters", 10)),
      common.calibrate_weights_pass("minmax"),
  ), "temporal-aggregated smoothing, per-layer α grid, training-free LoRA, W group-32 / A dynamic per-tensor")
