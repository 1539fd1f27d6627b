"""Q-DiT: the evolutionary search respects its constraint and finds optima, the searched plan uses
per-layer group sizes with dynamic per-token-group activations, and its fitness is the real model's error."""
import ml_collections
import numpy as np
import pytest

from dqjax.calib import smoothing as sm
from dqjax.methods import recipe
from dqjax.methods.qdit import evolutionary_search
from tests.methods.dit_ptq_nets import calib, tiny_dit


def test_evolutionary_search_is_deterministic_and_constrained():
  options = [(8, 16, 32, 48, 96)] * 6
  target = (1, 4, 0, 3, 2, 4)                     # optimum: sizes 16, 96, 8, 48, 32, 96 (mean 49.3)
  fitness = lambda gn: sum((a - b) ** 2 for a, b in zip(gn, target))
  mean = lambda gn: np.mean([o[i] for o, i in zip(options, gn)])
  constraint = lambda gn: mean(gn) >= 32
  run = lambda seed: evolutionary_search(fitness, options, constraint=constraint, seed_genome=(2,) * 6,
                                         population=16, epochs=20, top_k=4, mutations=8, crossovers=8,
                                         mutate_prob=0.3, seed=seed)
  best, fit, history, n_eval = run(0)
  assert best == target and fit == 0
  assert all(b <= a for a, b in zip(history, history[1:]))          # elitist: never gets worse
  assert run(0) == (best, fit, history, n_eval)                    # same seed → same result
  tight = lambda gn: mean(gn) >= 60                                # the optimum is now illegal
  best2, _, _, _ = evolutionary_search(fitness, options, constraint=tight, seed_genome=(4,) * 6, seed=0)
  assert tight(best2)
  with pytest.raises(ValueError, match="violates the constraint"):
    evolutionary_search(fitness, options, constraint=tight, seed_genome=(0,) * 6)


def test_granularity_search_on_tiny_dit():
  model, params, ex = tiny_dit()
  data = calib()
  cfg = ml_collections.ConfigDict(dict(candidates=(4, 8, 16), min_mean_group=8.0, initial_group=8,
                                       population=8, epochs=3, fitness_samples_per_step=8))
  qm = recipe.build("qdit", cfg)(model, params, ex, data, w_bits=4, a_bits=4, model_family="dit")
  meta = qm.meta["qdit"]
  assert meta["mean_group"] >= 8.0 and meta["fitness"] <= meta["seed_fitness"]
  for name, g in meta["group_sizes"].items():
    kind = name.rsplit("/", 1)[1]
    paths = {"qkv": ("attn1/to_q", "attn1/to_k", "attn1/to_v"), "proj": ("attn1/to_out_0",),
             "fc1": ("ff/net_0/proj",), "fc2": ("ff/net_2",)}[kind]
    for rel in paths:
      op = qm.plan[f"transformer_blocks_0/{rel}"]
      assert op.weight.granularity == "group" and op.weight.group_size == g
      a = op.act_spec("input")
      assert a.dynamic and a.granularity == "group" and a.group_size == g and not a.symmetric
  assert not qm.plan["transformer_blocks_0/norm1/linear"].quantized            # RTN path: adaLN float
  # the search's fitness of the chosen genome is exactly the error of the final quantized model
  f = sm.model_error_fn(qm, data, samples_per_step=8)
  np.testing.assert_allclose(float(f(qm.params, qm.qstate)["eps"]), meta["fitness"], rtol=1e-4)
  with pytest.raises(ValueError, match="min_mean_group"):
    recipe.build("qdit", ml_collections.ConfigDict(dict(candidates=(4, 8), min_mean_group=32.0)))(
        model, params, ex, data, w_bits=4, a_bits=8, model_family="dit")
