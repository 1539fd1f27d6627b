"""EDA-DM: TDAC step weights from feature density/diversity, and FBR's joint block + layer reconstruction."""
import dataclasses

import numpy as np

from dqjax.calib import calib_sets
from dqjax.calib import reconstruct as rc
from dqjax.methods import recipe
from dqjax.methods.eda_dm import step_features, tdac_weights
from tests.methods.unet_ptq_nets import TINY, tiny_unet, trajectory


# `unet_ptq_nets.TINY` cut to one resolution: still a ResBlock (the FBR block) and the middle attention (TDAC's
# features), with half the ops to discover, calibrate and trace
ONE_LEVEL = dataclasses.replace(TINY, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                up_block_types=("UpBlock2D",))


def test_tdac_weights_match_density_and_diversity():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(2, 3, 3, 4))
  # steps 0-3: one tight cluster (dense, similar directions); steps 4-5: far apart and rotated (diverse)
  feats = np.stack([base + 0.01 * rng.normal(size=base.shape) for _ in range(4)]
                   + [5 * rng.normal(size=base.shape), -5 * rng.normal(size=base.shape)])
  w = tdac_weights(feats, r=0.1, lam=1.0)
  flat = feats.reshape(6, -1)
  d2 = ((flat[:, None] - flat[None]) ** 2).mean(-1)
  density = ((d2 <= 0.1) & ~np.eye(6, dtype=bool)).sum(1)
  assert list(density) == [3, 3, 3, 3, 0, 0]
  unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  u = unit.reshape(6, -1, 4)
  div = np.array([sum((1 - (u[a] * u[b]).sum(-1)).sum() for b in range(6) if b != a) for a in range(6)])
  mm = lambda v: (v - v.min()) / (v.max() - v.min())
  np.testing.assert_allclose(w, mm(density) + mm(div), rtol=1e-4, atol=1e-5)
  counts = calib_sets.counts_from_weights(w, 60)
  assert counts.sum() == 60 and counts[:4].min() > 0


def test_fbr_joint_block_and_layer_reconstruction():
  model, params, ex = tiny_unet(config=ONE_LEVEL)
  data = trajectory(steps=6, n=8)
  from configs.methods.eda_dm import get_config
  c = get_config()
  c.num_samples, c.weight_init, c.act_init = 48, "minmax", "minmax"
  c.recon_only = "nothing"                       # calibrated model without FBR, to compare against
  qm = recipe.build("eda_dm", c)(model, params, ex, data, w_bits=4, a_bits=8)
  # TDAC on the model's own mid-block features: non-uniform weights over the steps
  feats = step_features(qm, data)
  assert feats.shape[:2] == (6, 8) and tdac_weights(feats).std() > 0
  # FBR on one ResBlock: AdaRound logits and activation steps learned in one joint pass with QDrop,
  # and the loss has a term for every Conv/Dense layer of the block except the last one called
  path = "down_blocks_0/resnets_0"
  block = [b for b in rc.partition(qm.plan) if b.path == path][0]
  from dqjax.methods.eda_dm import FBR
  cfg = FBR.replace(iters=5, num_samples=48, progress=False)    # compile-bound: a few steps move every trainable
  assert rc._layer_paths(qm.plan, block, cfg) == [f"{path}/conv1", f"{path}/time_emb_proj"]
  out = rc.reconstruct(qm, data, [block], cfg, phase="joint")
  st0, st1 = qm.qstate[f"{path}/conv1"], out.qstate[f"{path}/conv1"]
  assert st0.rounding is None and st1.rounding is not None
  assert not np.allclose(np.asarray(st0.acts["input"].qp.scale), np.asarray(st1.acts["input"].qp.scale))
  first, last = out.meta["reconstruction"][f"joint:{path}"]
  assert np.isfinite(first) and np.isfinite(last)
