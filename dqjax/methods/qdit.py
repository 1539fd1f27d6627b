"""Q-DiT: accurate post-training quantization for diffusion transformers (Chen et al., CVPR 2025,
arXiv 2406.17343; code Juanerx/Q-DiT).

Implemented:
* **Group-wise weights**: asymmetric min-max per (output channel, group of g input channels).
* **Sample-wise dynamic activation quantization**: asymmetric min-max per (sample, token, group of g
  channels), computed at run time — parameters follow every timestep, sample and token; no calibration.
* **Automatic granularity allocation** by evolutionary search: one gene per layer (qkv — to_q/to_k/to_v
  share one —, proj, fc1, fc2 of every block) chooses its group size g (tied between W and A as in the code)
  from `candidates`; constraint mean(g) ≥ `min_mean_group` (the code's efficiency proxy, mean ≥ 128 with
  candidates {32, 64, 128, 192, 288} for width 1152); population → keep top-k → mutate (per-gene p) and
  uniform crossover, resample illegal candidates, refill randomly, seeded by the uniform genome.
* **Fitness**: a cheap proxy — the mean squared error of the quantized denoiser's output against the float
  output over the calibration inputs (all selected timesteps, CFG pairs kept together). The paper uses FID
  of 800 generated images; we say so in the bench table. Candidates are evaluated by ONE compiled function:
  every layer's weights are quantized once per candidate group size and stacked, every layer's dynamic
  activation quantizer switches among the candidate specs with `lax.switch`, and a genome is an int vector
  of indices (`dqjax.calib.smoothing.variant_error_fn`), so no candidate recompiles; fitness values are
  cached by genome.
* Quantized: qkv, proj, fc1, fc2 of the blocks (the code's RTN path); embedders, adaLN, final layer and
  attention matmuls stay float.

Deviations: candidate group sizes are scaled to the width (default {8, 16, 32, 48, 96} for 96 channels and
mean ≥ 32, i.e. the same fraction of the width as the paper's); CPU-sized EA (population 16, 4 epochs,
paper 50 and 10); RTN weights (the GPTQ option of the code is not implemented).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dqjax.calib import smoothing as sm
from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register
from dqjax.quant.spec import QuantSpec

FAMILY = "dit_ptq/group"


def weight_spec(bits: int, g: int) -> QuantSpec:
  return QuantSpec("int", bits, symmetric=False, granularity="group", axis=-2, group_size=int(g))


def act_spec(bits: int, g: int) -> QuantSpec:
  return QuantSpec("int", bits, symmetric=False, granularity="group", axis=-1, group_size=int(g), dynamic=True)


def evolutionary_search(fitness: Callable[[tuple], float], options: Sequence[Sequence[int]], *,
                        constraint: Callable[[tuple], bool], seed_genome: tuple, population: int = 16,
                        epochs: int = 4, top_k: int = 4, mutations: int = 6, crossovers: int = 6,
                        mutate_prob: float = 0.1, seed: int = 0, max_tries: int = 1000):
  """Q-DiT's evolutionary loop over genomes (tuples of option indices, one per gene); lower fitness is
  better. Returns (best genome, its fitness, history of the best fitness per epoch, #evaluations)."""
  rng = np.random.default_rng(seed)
  cache: dict = {}

  def fit(gn):
    if gn not in cache:
      cache[gn] = float(fitness(gn))
    return cache[gn]

  def random_genome():
    for _ in range(max_tries):
      gn = tuple(int(rng.integers(len(o))) for o in options)
      if constraint(gn):
        return gn
    return seed_genome

  def legal_or_none(gn):
    return gn if constraint(gn) else None

  if not constraint(seed_genome):
    raise ValueError("evolutionary_search: the seed genome violates the constraint")
  pop = [seed_genome]
  while len(pop) < population:
    pop.append(random_genome())
  history = []
  for _ in range(epochs):
    ranked = sorted(set(pop), key=fit)
    history.append(fit(ranked[0]))
    parents = ranked[:top_k]
    children = []
    for _ in range(mutations):
      for _ in range(max_tries):
        p = parents[int(rng.integers(len(parents)))]
        gn = tuple(int(rng.integers(len(o))) if rng.random() < mutate_prob else g for g, o in zip(p, options))
        if legal_or_none(gn):
          children.append(gn)
          break
    for _ in range(crossovers):
      for _ in range(max_tries):
        a, b = (parents[int(i)] for i in rng.integers(len(parents), size=2))
        gn = tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))
        if legal_or_none(gn):
          children.append(gn)
          break
    pop = parents + children
    while len(pop) < population:
      pop.append(random_genome())
  ranked = sorted(set(pop), key=fit)
  history.append(fit(ranked[0]))
  return ranked[0], fit(ranked[0]), history, len(cache)


def granularity_search_pass(*, candidates=(8, 16, 32, 48, 96), min_mean_group: float = 32.0,
                            samples_per_step: int = 8, ea: dict | None = None, seed: int = 0,
                            search: bool = True):
  def run(qm, data):
    groups = sm.dit_groups(qm.plan)
    if not groups:
      return qm
    w_bits = {g.name: qm.plan[g.paths[0]].weight.bits for g in groups}
    a_specs = {g.name: qm.plan[g.paths[0]].act_spec("input") for g in groups}
    options = []
    for g in groups:
      c_in = sm.kernel_of(qm, g.paths[0]).shape[0]
      ok = tuple(c for c in candidates if c_in % c == 0)
      if not ok:
        raise ValueError(f"Q-DiT: no candidate group size in {tuple(candidates)} divides {g.name}'s "
                         f"{c_in} input channels")
      options.append(ok)
    # the uniform seed genome (the code's all-128): per gene the smallest option >= the target mean
    seed_genome = tuple(next((i for i, c in enumerate(o) if c >= min_mean_group), len(o) - 1) for o in options)
    mean_g = lambda gn: float(np.mean([o[i] for o, i in zip(options, gn)]))
    constraint = lambda gn: mean_g(gn) >= min_mean_group - 1e-9
    if not constraint(seed_genome):
      raise ValueError(f"Q-DiT config min_mean_group={min_mean_group} cannot be met with candidates "
                       f"{tuple(candidates)} on this model (largest usable mean {mean_g(seed_genome)}); "
                       "accepted: a value <= that mean")

    def specs_of(gn):
      out = {}
      for g, o, i in zip(groups, options, gn):
        a = a_specs[g.name]
        for p in g.paths:
          out[p] = (weight_spec(w_bits[g.name], o[i]),
                    None if a is None else act_spec(a.bits, o[i]))
      return out

    meta = {}
    best = seed_genome
    if search:
      variants = {}
      for g, o in zip(groups, options):
        a = a_specs[g.name]
        ch = tuple((weight_spec(w_bits[g.name], c), None if a is None else act_spec(a.bits, c)) for c in o)
        for p in g.paths:
          variants[p] = sm.OpVariants(ch)
      f = sm.variant_error_fn(qm, data, variants, samples_per_step=samples_per_step)
      index = {p: gi for gi, g in enumerate(groups) for p in g.paths}

      def fitness(gn):
        return float(f({p: gn[i] for p, i in index.items()})["eps"])

      ea_kw = dict(ea or {})
      best, best_fit, history, n_eval = evolutionary_search(fitness, options, constraint=constraint,
                                                            seed_genome=seed_genome, seed=seed, **ea_kw)
      meta = {"fitness": best_fit, "seed_fitness": fitness(seed_genome), "history": history,
              "evaluations": n_eval, "proxy": "denoiser output MSE over calibration inputs (paper: FID)"}
    plan = qm.plan
    for p, (w, a) in specs_of(best).items():
      op = plan[p]
      acts = tuple((n, a if n == "input" else s) for n, s in op.acts)
      plan = plan.with_specs(p, weight=w, acts=acts)
    meta["group_sizes"] = {g.name: o[i] for g, o, i in zip(groups, options, best)}
    meta["mean_group"] = mean_g(best)
    return qm.replace(plan=plan, meta={**qm.meta, "qdit": meta})
  return run


def _rules(config):
  def rules(w_bits, a_bits, model_family="dit"):
    g = common.config_get(config, "initial_group", 32)
    a = None if a_bits >= 16 else act_spec(a_bits, g)
    return sm.build_rules(weight_spec(w_bits, g), a, only=sm.BLOCK_LINEARS)
  return rules


@register("qdit", family=FAMILY, model_families=("dit",),
          paper="Q-DiT (Chen et al., CVPR 2025, arXiv 2406.17343)")
def qdit(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  ea = dict(population=get("population", 16), epochs=get("epochs", 4), top_k=get("top_k", 4),
            mutations=get("mutations", 6), crossovers=get("crossovers", 6), mutate_prob=get("mutate_prob", 0.1))
  return Recipe("qdit", FAMILY, _rules(config), chain(
      granularity_search_pass(candidates=tuple(get("candidates", (8, 16, 32, 48, 96))),
                              min_mean_group=get("min_mean_group", 32.0),
                              samples_per_step=get("fitness_samples_per_step", 8), ea=ea, seed=get("seed", 0),
                              search=get("search", True)),
      sm.fit_groups_pass(),
      common.calibrate_weights_pass(get("weight_method", "minmax")),
  ), "evolutionary per-layer group size (W and A), dynamic per-token-group activations")
