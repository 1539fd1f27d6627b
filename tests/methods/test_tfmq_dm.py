"""TFMQ-DM: TIAR reconstructs the temporal path against its outputs; FSC tables hold the exact per-timestep
ranges of the temporal features over the finite set of timesteps."""
import jax.numpy as jnp
import numpy as np

from dqjax.calib import calibrate
from dqjax.calib import reconstruct as rc
from dqjax.methods import recipe
from dqjax.methods.tfmq_dm import blocks_fn, temporal_block
from dqjax.quant import ops as qops
from dqjax.quant import tables
from tests.methods.unet_ptq_nets import tiny_unet, trajectory


def _config():
  from configs.methods.tfmq_dm import get_config
  c = get_config()
  c.weight_init, c.act_init, c.iters_w, c.recon_w_lr_w = "minmax", "minmax", 60, 2e-2
  c.recon_only = "nothing"          # TIAR only: the BRECQ blocks are tested in test_reconstruct
  return c


def test_tiar_and_fsc():
  model, params, ex = tiny_unet()
  data = trajectory(steps=5, n=4)
  cfg = _config()
  rec = recipe.build("tfmq_dm", cfg)
  qm = rec(model, params, ex, data, w_bits=3, a_bits=8)

  # --- TIAR: one block over the temporal layers, loss over every ResBlock's time_emb_proj output
  tib = temporal_block(qm.plan)
  assert tib.path == "" and "time_embedding/linear_2" in tib.ops
  assert "time_embedding/linear_1" not in tib.ops                    # kept in float (as the code)
  assert len(tib.outputs) == 8 and all(p.endswith("time_emb_proj") for p in tib.outputs)
  # round-to-nearest baseline: only the temporal ops feed the block's outputs, so only they need weight ranges
  rtn = calibrate.calibrate_weights(recipe.prepare(model, params, rec.rules(3, 8), ex), "minmax",
                                    paths=set(tib.ops))
  assert rc.block_output_error(qm, data, tib) < 0.9 * rc.block_output_error(rtn, data, tib)
  # the other blocks never learn the temporal layers (they keep the TIAR rounding)
  cfg.recon_only = None
  for b in blocks_fn(cfg)(qm)[1:]:
    assert not any(p.endswith("time_emb_proj") or p.startswith("time_embedding") for p in b.ops)
  assert qm.plan["down_blocks_1/resnets_0/conv_shortcut"].weight is None   # float as in the code

  # --- FSC: exact min/max of the temporal features at every timestep of the finite set
  path = "mid_block/resnets_0/time_emb_proj"
  act = qm.qstate[path].acts["input"]
  spec = qm.plan[path].act_spec("input")
  assert act.qp.scale.shape[0] == 5 and qm.meta["fsc_timesteps"] == sorted(np.asarray(data.ts).astype(int),
                                                                            reverse=True)
  fn, _ = rc.capture_fn(qm.model, qm.plan, (path,), quantized=False)
  scales = []
  for t in np.asarray(data.ts):
    x = data.xs[0]
    feat = fn(qm.params, {}, x, jnp.full((x.shape[0],), t), None)[path][0]
    want = qops.params_from_range(jnp.min(feat), jnp.max(feat), spec)
    got = tables.lookup(act.qp, act.index, jnp.asarray(t))
    np.testing.assert_allclose(np.ravel(got.scale), np.ravel(want.scale), rtol=1e-5)
    np.testing.assert_allclose(np.ravel(got.zero_point), np.ravel(want.zero_point), atol=1e-4)
    scales.append(float(np.ravel(got.scale)[0]))
  assert np.ptp(scales) > 0                                              # the ranges move with t
  # non-temporal activations keep one static range
  assert qm.qstate["mid_block/resnets_0/conv1"].acts["input"].qp.scale.shape[0] == 1
