"""The baselines every table includes: naive min-max PTQ and MSE-search PTQ.

Both quantize weights per output channel (symmetric) and activations per tensor (asymmetric, static,
one range for all timesteps), the attention matmul operands included. They differ only in how ranges are
chosen: min/max of the data versus an Lp shrink-grid search (p=2.4 for activations as in Q-Diffusion/TFMQ,
p=2 for weights).
"""
from __future__ import annotations

from dqjax.methods import common
from dqjax.methods.recipe import Recipe, chain, register


def _rules(config):
  def rules(w_bits, a_bits, model_family="unet"):
    return common.standard_rules(
        w_bits, a_bits, first_last_bits=common.config_get(config, "first_last_bits", None),
        quantize_matmuls=common.config_get(config, "quantize_matmuls", True),
        keep_fp=tuple(common.config_get(config, "keep_fp", ())))
  return rules


@register("minmax", family="baseline", paper="naive min-max PTQ")
def minmax(config=None) -> Recipe:
  return Recipe("minmax", "baseline", _rules(config),
                chain(common.calibrate_weights_pass("minmax"),
                      common.calibrate_activations_pass(
                          "minmax", batch_size=common.config_get(config, "batch_size", None))),
                "per-channel min-max weights, per-tensor min-max activations")


@register("mse", family="baseline", paper="MSE-search PTQ (LAPQ-style shrink grid)")
def mse(config=None) -> Recipe:
  return Recipe("mse", "baseline", _rules(config),
                chain(common.calibrate_weights_pass("mse", num_candidates=common.config_get(config, "candidates", 100),
                                                    p=2.0),
                      common.calibrate_activations_pass(
                          "mse", batch_size=common.config_get(config, "batch_size", None),
                          num_candidates=common.config_get(config, "candidates", 100), p=2.4)),
                "per-channel MSE-searched weights, per-tensor Lp(2.4)-searched activations")
