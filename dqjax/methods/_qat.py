"""Shared pieces of the QAT / LoRA / ultra-low-bit recipes: module-path patterns of the zoo's model families,
quantizer specs at any bit width (1 bit = binary), and the data-free setup every one of them starts from (FP
trajectories of the model's own sampler, calibrated per step). The training loop itself is
`dqjax.calib.distill`."""
from __future__ import annotations

from typing import Any, Optional

import ml_collections

from dqjax.calib import calibrate, distill
from dqjax.calib.data import CalibData
from dqjax.methods.common import FIRST_LAST, config_get
from dqjax.quant import tables
from dqjax.quant.spec import BINARY, QuantSpec

# Module paths (full-match regexes) of the zoo's U-Nets (diffusers names) and DiT.
TIME_EMBED = r"(.*/)?(time_embedding|timestep_embedder)/.*"
EMB_PROJ = r".*time_emb_proj"                 # ResBlock projections of the time embedding (LDM's emb_layers)
SKIP_CONV = r".*conv_shortcut"                # 1×1 convolutions of residual shortcuts (LDM's 'skip')
DOWNSAMPLE = r".*downsamplers_\d+/conv"       # strided down-sampling convolutions (LDM's 'op')
FIRST_LAST_OPS = FIRST_LAST
MATMULS = r".*(qk|sv)_matmul"
ATTN_PROJ = r".*/(to_q|to_k|to_v|to_out_0)"


def weight_spec(bits: int, *, symmetric: bool = True) -> Optional[QuantSpec]:
  """Per-output-channel weights; 1 bit is the binary format (±α per channel); ≥ 16 bits: float."""
  if bits >= 16:
    return None
  if bits == 1:
    return QuantSpec(BINARY, granularity="channel", axis=-1)
  return QuantSpec("int", bits, symmetric=symmetric, granularity="channel", axis=-1)


def act_spec(bits: int, *, symmetric: bool = False, signed: bool = True) -> Optional[QuantSpec]:
  """Per-tensor static activations; 1 bit is binary; ≥ 16 bits: float."""
  if bits >= 16:
    return None
  if bits == 1:
    return QuantSpec(BINARY, granularity="tensor")
  return QuantSpec("int", bits, symmetric=symmetric, signed=signed, granularity="tensor")


def get(config, key, default):
  return config_get(config, key, default)


def distill_config(config: Any, **defaults) -> distill.DistillConfig:
  """The method's DistillConfig: recipe defaults, then the same-named fields of its ml_collections config."""
  return distill.config_from(config, distill.DistillConfig(**defaults))


def trajectories(qm, data: Optional[CalibData], size: int, seed: int):
  """(pool, per-step calibration data): FP trajectories of the model's sampler when `qm.env` exists (every
  sampler step, CFG batches as the sampler runs them), else the given calibration data."""
  if qm.env is not None:
    pool = distill.make_pool(qm, size, seed)
    return pool, distill.pool_calib_data(pool, qm.env)
  if data is None:
    raise ValueError("this QAT recipe needs QModel.env (DiffusionEnv) or calibration data")
  return distill.pool_from_calib(data), data


def calibrate_acts(qm, data: CalibData, method: str, table: tables.TableSpec, batch_size: Optional[int] = None,
                   **kw):
  return calibrate.calibrate_activations(qm, data, method, table=table, batch_size=batch_size, **kw)


def paper(config: Any) -> dict:
  """The paper's settings recorded in a method config (`config.paper`), for reports."""
  p = get(config, "paper", None)
  if p is None:
    return {}
  return p.to_dict() if isinstance(p, ml_collections.ConfigDict) else dict(p)


# --- binary networks (BinaryDM, BiDM) ------------------------------------------------------------------
def num_levels(plan) -> int:
  """Resolution levels of a U-Net plan (1 + the largest down-block index)."""
  import re
  idx = [int(m.group(1)) for op in plan.ops for m in [re.match(r"down_blocks_(\d+)/", op.path)] if m]
  return 1 + max(idx) if idx else 1


def unet_level(path: str, levels: int):
  """Resolution level of a U-Net op (0 = full resolution; the middle block is the deepest level)."""
  import re
  m = re.match(r"down_blocks_(\d+)/", path)
  if m:
    return int(m.group(1))
  m = re.match(r"up_blocks_(\d+)/", path)
  if m:
    return levels - 1 - int(m.group(1))
  if path.startswith("mid_block/"):
    return levels - 1
  return None


def add_extra(qm, path: str, name: str, value):
  st = qm.qstate[path]
  extra = dict(st.extra)
  extra[name] = value
  qstate = dict(qm.qstate)
  qstate[path] = st.replace(extra=extra)
  return qm.replace(qstate=qstate)


def add_shortcuts(qm, paths, gamma: float):
  """BinaryDM/BiDM's learnable scaled shortcut y + |γ|·shortcut(x) around binary convolutions. When the channel
  counts differ the shortcut is a 1×1 convolution, zero-initialised here so the network starts unchanged apart
  from the identity shortcuts."""
  import jax.numpy as jnp
  for path in paths:
    op = qm.plan[path]
    if op.info.kind != "conv":
      continue
    cin, cout = op.info.input_shapes[0][-1], op.info.weight_shape[-1]
    value = {"gamma": jnp.asarray(gamma, jnp.float32)}
    if cin != cout:
      value["kernel"] = jnp.zeros((cin, cout), jnp.float32)
    qm = add_extra(qm, path, "shortcut", value)
  return qm
