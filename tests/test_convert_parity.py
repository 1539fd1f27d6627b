"""dqjax models against diffusers itself: tiny random diffusers models saved with save_pretrained
(safetensors), loaded by dqjax (no torch inside dqjax), same outputs within TOL = 1e-4 max abs error (fp32)."""
import json
import os

import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch", reason="parity tests need the torch extra (pip install -e .[torch])")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (pip install -e .[torch])")

from safetensors.numpy import load_file, save_file  # noqa: E402

from dqjax.models import convert  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _save(model, path, **kw):
  model.save_pretrained(str(path), safe_serialization=True, **kw)
  return str(path)


def _randomize(model, seed=0):
  """diffusers zero-initialises some layers (e.g. DiT's adaLN); random values make parity meaningful."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.2)
  return model.eval()


def _close(out, ref):
  err = float(np.max(np.abs(np.asarray(out) - ref)))
  assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


UNET2D_CASES = {
    # DDPM-CIFAR-10 style: padding 0, no flip, shift 1, one head over all channels, eps 1e-6
    "ddpm_pad0": dict(down=("DownBlock2D", "AttnDownBlock2D"), up=("AttnUpBlock2D", "UpBlock2D"),
                      extra=dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
                                 norm_eps=1e-6)),
    # no attention anywhere, centred input, wider time embedding
    "plain_pad1": dict(down=("DownBlock2D", "DownBlock2D"), up=("UpBlock2D", "UpBlock2D"),
                       extra=dict(downsample_padding=1, add_attention=False, center_input_sample=True,
                                  time_embedding_dim=40)),
    # class-conditional with a null row (5 = 4 classes + null), scale-shift time conditioning, mid scale
    "class_scale_shift": dict(down=("AttnDownBlock2D", "DownBlock2D"), up=("UpBlock2D", "AttnUpBlock2D"),
                              extra=dict(num_class_embeds=5, resnet_time_scale_shift="scale_shift",
                                         mid_block_scale_factor=1.4, attention_head_dim=8)),
}


@pytest.mark.parametrize("case", sorted(UNET2D_CASES))
def test_unet2d_parity(tmp_path, case):
  spec = UNET2D_CASES[case]
  torch.manual_seed(0)
  m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                            layers_per_block=1, down_block_types=spec["down"], up_block_types=spec["up"],
                            norm_num_groups=8, **spec["extra"])
  _randomize(m)
  model, params, cfg = convert.load_diffusers(_save(m, tmp_path))
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  y = np.array([1, 4]) if cfg.num_class_embeds else None
  with torch.no_grad():
    ref = m(_nchw(x), torch.from_numpy(t), class_labels=None if y is None else torch.from_numpy(y)).sample
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y))
  _close(out, _nhwc(ref))


UNET_COND_CASES = {
    # SD-1.x style: 1×1 conv projections, per-block head counts
    "conv_proj": dict(attention_head_dim=(2, 4), layers_per_block=1),
    # SD-2.x style: linear projections, two transformer layers, per-block layers and cross dims
    "linear_proj": dict(attention_head_dim=2, use_linear_projection=True, transformer_layers_per_block=2,
                        layers_per_block=(1, 2)),
}


@pytest.mark.parametrize("case", sorted(UNET_COND_CASES))
def test_unet2d_condition_parity(tmp_path, case):
  torch.manual_seed(0)
  m = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                     norm_num_groups=8, **UNET_COND_CASES[case])
  _randomize(m)
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  with torch.no_grad():
    ref = m(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  _close(out, _nhwc(ref))


def test_dit_parity(tmp_path):
  """Learned sigma (out = 2 × in), the null class label, and an input larger than sample_size (positions
  interpolated over the training grid, as diffusers does)."""
  torch.manual_seed(0)
  m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  _randomize(m)
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  t = np.array([5.0, 900.0], np.float32)
  y = np.array([3, 10])
  for size in (8, 12):
    x = np.random.default_rng(size).standard_normal((2, size, size, 4)).astype(np.float32)
    with torch.no_grad():
      ref = m(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    assert out.shape == (2, size, size, 8)
    _close(out, _nhwc(ref))


def test_autoencoder_kl_parity(tmp_path):
  torch.manual_seed(0)
  m = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              layers_per_block=1, norm_num_groups=4, sample_size=16)
  _randomize(m)
  model, params, cfg = convert.load_diffusers(_save(m, tmp_path))
  assert cfg.scaling_factor == m.config.scaling_factor
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 1)).astype(np.float32)
  with torch.no_grad():
    post = m.encode(_nchw(x)).latent_dist
    dec = m.decode(post.mean).sample
  mean, logvar = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
  _close(mean, _nhwc(post.mean))
  _close(logvar, _nhwc(post.logvar))
  out = model.apply({"params": params}, mean, method=model.decode)
  _close(out, _nhwc(dec))


def test_vq_model_parity(tmp_path):
  torch.manual_seed(0)
  m = diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=5)
  _randomize(m)
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    h = m.encode(_nchw(x)).latents
    quant, _, (_, _, idx) = m.quantize(h)
    dec = m.decode(h).sample
    dec_raw = m.decode(h, force_not_quantize=True).sample
  lat = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
  _close(lat, _nhwc(h))
  q, codes = model.apply({"params": params}, lat, method=model.quantize_latents)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), idx.numpy().reshape(-1))
  _close(q, _nhwc(quant))
  _close(model.apply({"params": params}, lat, method=model.decode), _nhwc(dec))
  _close(model.apply({"params": params}, lat, True, method=model.decode), _nhwc(dec_raw))


def _tiny_unet():
  torch.manual_seed(0)
  m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
  return _randomize(m)


def _unet_ref(m, x, t):
  with torch.no_grad():
    return _nhwc(m(_nchw(x), torch.from_numpy(t)).sample)


def test_sharded_and_legacy_attention_names(tmp_path):
  """A sharded checkpoint (index.json), and old attention names query/key/value/proj_attn stored as 1×1
  convolutions, both load to the same function."""
  m = _tiny_unet()
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
  t = np.array([1.0, 999.0], np.float32)
  ref = _unet_ref(m, x, t)
  sharded = _save(m, tmp_path / "sharded", max_shard_size="30KB")
  assert os.path.isfile(os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json"))
  model, params, _ = convert.load_diffusers(sharded)
  _close(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t)), ref)

  legacy = _save(m, tmp_path / "legacy")
  path = os.path.join(legacy, "diffusion_pytorch_model.safetensors")
  sd = load_file(path)
  renamed = {}
  for k, v in sd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    renamed[k] = v
  assert any(".proj_attn." in k for k in renamed)
  save_file(renamed, path)
  model, params, _ = convert.load_diffusers(legacy)
  _close(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t)), ref)


def test_export_round_trip(tmp_path):
  """dqjax → export → diffusers.from_pretrained gives the same tensors and the same outputs."""
  m = _tiny_unet()
  model, params, cfg = convert.load_diffusers(_save(m, tmp_path / "a"))
  out_dir = convert.export_diffusers(str(tmp_path / "b"), cfg, params)
  back = diffusers.UNet2DModel.from_pretrained(out_dir).eval()
  sd_a, sd_b = m.state_dict(), back.state_dict()
  assert sorted(sd_a) == sorted(sd_b)
  for k in sd_a:
    np.testing.assert_array_equal(sd_a[k].numpy(), sd_b[k].numpy(), err_msg=k)
  with open(os.path.join(out_dir, "config.json")) as f:
    assert json.load(f)["_class_name"] == "UNet2DModel"
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temporary directory left behind


def test_export_round_trip_dit(tmp_path):
  """The DiT's per-block copies of the embedders survive export (diffusers loads every tensor back)."""
  torch.manual_seed(0)
  m = _randomize(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                                 num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=3))
  _, params, cfg = convert.load_diffusers(_save(m, tmp_path / "a"))
  back = diffusers.DiTTransformer2DModel.from_pretrained(convert.export_diffusers(str(tmp_path / "b"), cfg, params))
  for k, v in m.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), back.state_dict()[k].numpy(), err_msg=k)


def test_load_errors(tmp_path):
  m = _tiny_unet()
  d = _save(m, tmp_path / "a")
  cfg_path = os.path.join(d, "config.json")
  with open(cfg_path) as f:
    c = json.load(f)
  with open(cfg_path, "w") as f:
    json.dump({**c, "bogus_field": 1}, f)
  with pytest.raises(ValueError, match="unknown config field 'bogus_field'"):
    convert.load_diffusers(d)
  with open(cfg_path, "w") as f:
    json.dump({**c, "act_fn": "mish"}, f)
  with pytest.raises(ValueError, match="'act_fn' = 'mish' is not supported.*accepted values: 'silu'"):
    convert.load_diffusers(d)
  with open(cfg_path, "w") as f:
    json.dump({**c, "block_out_channels": [8, 24]}, f)
  with pytest.raises(ValueError, match=r"shape mismatches: .*down_blocks\.1\.resnets\.0\.conv1\.weight"):
    convert.load_diffusers(d)
