"""TFMQ-DM: Temporal Feature Maintenance Quantization for Diffusion Models (Huang et al., CVPR 2024;
arXiv 2311.16503; ModelTC/TFMQ-DM).

Implemented, following the public code (quant/reconstruction.py, quant/calibration.py, quant/quant_model.py):
- TIAR (temporal information aware reconstruction): the temporal information block — the time-embedding MLP
  and every ResBlock's `time_emb_proj`, which together map t to the per-block temporal features — is
  reconstructed on its own with AdaRound, the loss summed over all `time_emb_proj` outputs against the float
  ones. It runs as a whole-model block whose outputs are those modules, so XLA keeps only the t → embedding
  path. The other blocks (ResBlocks, attention blocks) are then reconstructed with BRECQ/AdaRound with the
  temporal layers excluded from their trainables (they keep their TIAR rounding);
- FSC (finite set calibration): the temporal features depend only on t (and the class for class-conditional
  models), and t takes a finite set of values at inference, so the activation quantizers of the temporal
  path get a per-timestep table whose entries are the exact min/max of their inputs at each of the
  sampler's timesteps. `fsc_scope='all'` instead gives *every* activation quantizer a per-step table over
  the calibration trajectory (what the released code does: `act_{k}` tables for the whole model);
- which layers stay float (code: `QuantLayer` skips names with 'skip', 'op', 'shortcut' and downsample
  convs; `disable_out_quantization`): shortcut and downsample convs, conv_in and the time embedding's
  first layer (W and A), conv_out; the time embedding's second layer has no activation quantizer;
  weights per-channel asymmetric (MSE init), activations per-tensor asymmetric MSE, q/k/v/softmax quantized
  (softmax 8 bits). Activation step sizes are not reconstructed (FSC replaces it).

Deliberate deviations: CPU-sized iterations (`iters_w`; paper 20000); activation ranges outside the temporal
path are one static Lp search (the code: MSE init then EMA per step); the first ResBlock conv that the code
leaves without an activation quantizer is quantized like the others.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate
from dqjax.calib import reconstruct as rc
from dqjax.calib.calib_sets import trajectory_for
from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config
from dqjax.methods.recipe import Recipe, register
from dqjax.quant import tables

TEMPORAL_OPS = r"(time_embedding/linear_\d+|.*time_emb_proj)"
TEMPORAL_OUTPUTS = r".*time_emb_proj"
KEEP_FP = (r".*conv_shortcut", r".*downsamplers_\d+/conv", r"conv_in", r"conv_out", r"time_embedding/linear_1")
WEIGHT_RECON = rc.ReconConfig(iters=100, batch_size=16, lr_w=1e-2, round_weight=0.01, p=2.0, asym=True,
                              num_samples=256)


def temporal_block(plan, ops: str = TEMPORAL_OPS, outputs: str = TEMPORAL_OUTPUTS) -> rc.Block:
  """The temporal information block: learn the quantized temporal layers, compare every temporal output."""
  learn = tuple(op.path for op in plan.ops if op.quantized and re.fullmatch(ops, op.path))
  outs = tuple(op.path for op in plan.ops if re.fullmatch(outputs, op.path))
  if not outs:
    temporal = [op.path for op in plan.ops if re.fullmatch(ops, op.path)]
    outs = tuple(temporal[-1:])
  return rc.Block("temporal", "", learn, outs)


def blocks_fn(config):
  """TIAR's temporal block first, then the BRECQ blocks without the temporal layers."""
  get = lambda k, d: common.config_get(config, k, d)
  only = get("recon_only", None)

  def blocks(qm):
    out = [temporal_block(qm.plan)] if get("tiar", True) else []
    rest = rc.partition(qm.plan, exclude=(TEMPORAL_OPS,))
    out += [b for b in rest if not only or re.fullmatch(only, b.path)]
    return [b for b in out if b.ops]

  return blocks


def finite_timesteps(qm, data: CalibData) -> np.ndarray:
  """The timesteps the sampler will feed the network (from the recipe's env), else the data's."""
  if qm.env is not None:
    from dqjax.diffusion import samplers
    return np.unique(np.asarray(samplers.timesteps_for(qm.env.schedule, qm.env.sampler)))[::-1]
  return np.unique(np.asarray(data.ts))[::-1]


def fsc_pass(config):
  """Pass: per-timestep activation tables (FSC) for the temporal path, or for every op (scope 'all')."""
  get = lambda k, d: common.config_get(config, k, d)
  scope = get("fsc_scope", "temporal")
  if scope not in ("temporal", "all"):
    raise ValueError(f"config field fsc_scope={scope!r} is unknown; accepted values: temporal, all")

  def run(qm, data: CalibData):
    if scope == "all":
      traj = trajectory_for(qm, data, get("traj_samples", 32))
      return calibrate.calibrate_activations(qm, traj, get("fsc_method", "mse"),
                                             table=tables.TableSpec("per_step"), p=2.4)
    in_scope = [op.path for op in qm.plan.ops if op.acts and re.fullmatch(TEMPORAL_OPS, op.path)]
    if not in_scope:
      return qm
    ts = finite_timesteps(qm, data)
    n = data.num_samples
    # The temporal path ignores x_t: any x will do; the conditioning (class / CFG null) is the data's.
    xs = jnp.broadcast_to(data.xs[0][None], (len(ts),) + data.xs.shape[1:])
    conds = None if data.conds is None else jnp.broadcast_to(data.conds[0][None], (len(ts),) + data.conds.shape[1:])
    fsc_data = CalibData(xs, jnp.asarray(ts, jnp.float32), conds, jnp.arange(len(ts)))
    plan = qm.plan
    for op in qm.plan.ops:
      if op.acts and op.path not in in_scope:
        plan = plan.replace_op(op.path, acts=())
    sub = calibrate.calibrate_activations(qm.replace(plan=plan), fsc_data, "minmax",
                                          table=tables.TableSpec("per_step"), batch_size=n)
    qstate = dict(qm.qstate)
    for path in in_scope:
      qstate[path] = qstate[path].replace(acts=sub.qstate[path].acts)
    return qm.replace(qstate=qstate, meta={**qm.meta, "fsc_timesteps": [int(t) for t in ts]})

  return run


@register("tfmq_dm", family="unet_ptq/temporal", model_families=("unet", "unet_text"),
          paper="TFMQ-DM (arXiv 2311.16503)")
def tfmq_dm(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rules = rules_from_config(config, weight_symmetric=False, act_symmetric=False, keep_fp=KEEP_FP,
                            fp_acts=(r"time_embedding/linear_2",), quantize_matmuls=True, softmax_bits=8)
  w_cfg = rc.config_from(config, "recon_w_", WEIGHT_RECON).replace(iters=get("iters_w", WEIGHT_RECON.iters))
  passes = [common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0),
            rc.reconstruction_pass(w_cfg, phase="weights", blocks=blocks_fn(config)),
            common.calibrate_activations_pass(get("act_init", "mse"), p=2.4, batch_size=get("calib_batch", None)),
            fsc_pass(config)]

  def run(qm, data):
    for p in passes:
      qm = p(qm, data)
    return qm

  return Recipe("tfmq_dm", "unet_ptq/temporal", rules, run,
                "TIAR (time-embedding path reconstructed on its own against its outputs) + FSC (per-timestep "
                "activation tables for the temporal features) + BRECQ/AdaRound for the other blocks")
