"""dqjax models against diffusers itself: tiny random diffusers models saved with save_pretrained, loaded
by dqjax (no torch in dqjax), same outputs within 1e-4 (fp32)."""
import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch", reason="parity tests need the torch extra (pip install torch==2.13.0)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")

from dqjax.models import convert  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _save(model, tmp_path):
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  return str(tmp_path)


@pytest.mark.parametrize("attn,padding,classes", [(True, 0, None), (False, 1, None), (True, 1, 5)])
def test_unet2d_parity(tmp_path, attn, padding, classes):
  torch.manual_seed(0)
  down = ("DownBlock2D", "AttnDownBlock2D" if attn else "DownBlock2D")
  up = ("AttnUpBlock2D" if attn else "UpBlock2D", "UpBlock2D")
  m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                            layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=8,
                            attention_head_dim=8, downsample_padding=padding, num_class_embeds=classes,
                            flip_sin_to_cos=padding == 1, freq_shift=0 if padding else 1).eval()
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  y = None if classes is None else np.array([1, 4])
  with torch.no_grad():
    ref = m(_nchw(x), torch.from_numpy(t), class_labels=None if y is None else torch.from_numpy(y)).sample
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y))
  np.testing.assert_allclose(out, _nhwc(ref), atol=TOL)


def test_unet2d_condition_parity(tmp_path):
  torch.manual_seed(0)
  m = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                     attention_head_dim=2, norm_num_groups=8).eval()
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  with torch.no_grad():
    ref = m(_nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  np.testing.assert_allclose(out, _nhwc(ref), atol=TOL)


def test_dit_parity(tmp_path):
  torch.manual_seed(0)
  m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([5.0, 900.0], np.float32)
  y = np.array([3, 10])
  with torch.no_grad():
    ref = m(_nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  np.testing.assert_allclose(out, _nhwc(ref), atol=TOL)


def test_autoencoder_kl_parity(tmp_path):
  torch.manual_seed(0)
  m = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
  model, params, _ = convert.load_diffusers(_save(m, tmp_path))
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 1)).astype(np.float32)
  with torch.no_grad():
    post = m.encode(_nchw(x)).latent_dist
    dec = m.decode(post.mean).sample
  mean, _ = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
  np.testing.assert_allclose(mean, _nhwc(post.mean), atol=TOL)
  out = model.apply({"params": params}, mean, method=model.decode)
  np.testing.assert_allclose(out, _nhwc(dec), atol=TOL)


def test_export_round_trip_and_errors(tmp_path):
  torch.manual_seed(0)
  m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
  d = _save(m, tmp_path / "a")
  model, params, cfg = convert.load_diffusers(d)
  convert.export_diffusers(str(tmp_path / "b"), "UNet2DModel", cfg, params)
  back = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "b")).eval()
  for (k1, v1), (k2, v2) in zip(sorted(m.state_dict().items()), sorted(back.state_dict().items())):
    assert k1 == k2
    np.testing.assert_array_equal(v1.numpy(), v2.numpy())
  import json, os
  cfg_path = os.path.join(d, "config.json")
  c = json.load(open(cfg_path))
  c["bogus_field"] = 1
  json.dump(c, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="unknown config field 'bogus_field'"):
    convert.load_diffusers(d)
  c.pop("bogus_field")
  c["block_out_channels"] = [8, 24]
  json.dump(c, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="shape mismatches"):
    convert.load_diffusers(d)
