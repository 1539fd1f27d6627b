"""dqjax.models without torch: forward shapes on tiny configs, diffusers-style parameter names and targetable
op modules, determinism, config validation, and load/export of diffusers directories (round trip and the
missing / unexpected / mismatched tensor errors)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dqjax import models
from dqjax.models import convert
from dqjax.models.configs import (AutoencoderKLConfig, DiTConfig, UNet2DConditionConfig, UNet2DConfig,
                                  VQModelConfig)
from dqjax.models.layers import Concat, MatMul

UNET = UNet2DConfig(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=8, norm_num_groups=8)
UNET_CLASS = UNet2DConfig(**{**UNET.to_dict(), "block_out_channels": (16, 32), "num_class_embeds": 11,
                             "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                             "up_block_types": ("AttnUpBlock2D", "UpBlock2D")})
UNET_COND = UNet2DConditionConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                  layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                                  cross_attention_dim=12, norm_num_groups=8)
DIT = DiTConfig(sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=2, num_attention_heads=2,
                attention_head_dim=8, num_embeds_ada_norm=10)
AE = AutoencoderKLConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16)
VQ = VQModelConfig(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=5)

X2 = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
X4 = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
T = jnp.array([3.0, 800.0])
CTX = jax.random.normal(jax.random.key(3), (2, 5, 12))
LABELS = jnp.array([1, 10])

# (config, inputs, expected output shape) for every denoiser
DENOISERS = {
    "unet2d": (UNET, (X2, T, None), (2, 8, 8, 2)),
    "unet2d_class": (UNET_CLASS, (X2, T, LABELS), (2, 8, 8, 2)),
    "unet2d_condition": (UNET_COND, (X4, T, CTX), (2, 8, 8, 4)),
    "dit": (DIT, (X4, T, LABELS), (2, 8, 8, 8)),
}


def _init(cfg, inputs, seed=0):
  """Eager init with an RngBitGenerator key: each eager random op compiles far faster than threefry's
  (about half the cold-cache setup of this module); what is tested (init by seed) does not depend on it."""
  model = convert.model_for(cfg)
  return model, model.init(jax.random.key(seed, impl="unsafe_rbg"), *inputs)["params"]


def _apply(model, params, *args, method=None, **static):
  """model.apply run op by op: for these tiny models cheaper than compiling each whole network."""
  return model.apply({"params": params}, *args, method=method, **static)


@pytest.fixture(scope="module")
def initialised():
  return {k: _init(cfg, inputs) for k, (cfg, inputs, _) in DENOISERS.items()}


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_denoiser_forward_shape_and_finite(initialised, name):
  _, inputs, shape = DENOISERS[name]
  model, params = initialised[name]
  out = _apply(model, params, *inputs)
  assert out.shape == shape
  assert bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.std(out)) > 0


def test_init_is_deterministic():
  _, p1 = _init(UNET, (X2, T, None), seed=3)
  _, p2 = _init(UNET, (X2, T, None), seed=3)
  _, p3 = _init(UNET, (X2, T, None), seed=4)
  l1, l2, l3 = (jax.tree_util.tree_leaves(p) for p in (p1, p2, p3))
  assert all(np.array_equal(a, b) for a, b in zip(l1, l2))
  assert not all(np.array_equal(a, b) for a, b in zip(l1, l3))


def _shape(model, params, *args):
  """Trace the forward pass without computing it (enough to reach input validation)."""
  return jax.eval_shape(lambda: model.apply({"params": params}, *args))


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def test_parameter_names_mirror_diffusers(initialised):
  unet = _flat(initialised["unet2d"][1])
  for k in ("conv_in/kernel", "time_embedding/linear_1/kernel", "time_embedding/linear_2/bias",
            "down_blocks_0/resnets_0/norm1/scale", "down_blocks_0/resnets_0/time_emb_proj/kernel",
            "down_blocks_0/downsamplers_0/conv/kernel", "down_blocks_1/attentions_0/to_q/kernel",
            "down_blocks_1/attentions_0/group_norm/scale", "mid_block/attentions_0/to_out_0/kernel",
            "mid_block/resnets_1/conv2/kernel", "up_blocks_0/resnets_0/conv_shortcut/kernel",
            "up_blocks_0/upsamplers_0/conv/kernel", "conv_norm_out/scale", "conv_out/kernel"):
    assert k in unet, k
  assert _flat(initialised["unet2d_class"][1])["class_embedding/embedding"].shape == (11, 64)
  cond = _flat(initialised["unet2d_condition"][1])
  blk = "down_blocks_0/attentions_0/transformer_blocks_0/"
  for k in ("attn1/to_q/kernel", "attn2/to_k/kernel", "ff/net_0/proj/kernel", "ff/net_2/kernel", "norm3/scale"):
    assert blk + k in cond, k
  assert blk + "attn2/to_q/bias" not in cond  # diffusers' SD attention has no q/k/v bias
  assert cond[blk + "attn2/to_k/kernel"].shape == (12, 16)
  assert cond[blk + "ff/net_0/proj/kernel"].shape == (16, 128)  # GEGLU: 2 × 4 × dim
  dit = _flat(initialised["dit"][1])
  for i in range(2):
    assert f"transformer_blocks_{i}/norm1/emb/class_embedder/embedding_table/embedding" in dit
    assert dit[f"transformer_blocks_{i}/norm1/linear/kernel"].shape == (16, 96)
  assert dit["transformer_blocks_0/norm1/emb/class_embedder/embedding_table/embedding"].shape == (11, 16)
  assert dit["pos_embed/proj/kernel"].shape == (2, 2, 4, 16)
  assert dit["proj_out_2/kernel"].shape == (16, 2 * 2 * 8)


def _op_paths(model, params, inputs):
  """'/'-joined paths of every MatMul and Concat module called in a forward pass."""
  paths = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (MatMul, Concat)) and context.method_name == "__call__":
      paths.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.apply({"params": params}, *inputs))
  return paths


def test_targetable_op_modules(initialised):
  model, params = initialised["unet2d"]
  paths = _op_paths(model, params, DENOISERS["unet2d"][1])
  assert "up_blocks_0/skip_concat_0" in paths and "up_blocks_1/skip_concat_1" in paths
  assert "mid_block/attentions_0/qk_matmul" in paths and "mid_block/attentions_0/sv_matmul" in paths
  assert sum(p.endswith("skip_concat_0") or p.endswith("skip_concat_1") for p in paths) == 4
  model, params = initialised["unet2d_condition"]
  paths = _op_paths(model, params, DENOISERS["unet2d_condition"][1])
  assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/qk_matmul" in paths
  assert "mid_block/attentions_0/transformer_blocks_0/attn1/sv_matmul" in paths
  model, params = initialised["dit"]
  assert "transformer_blocks_1/attn1/qk_matmul" in _op_paths(model, params, DENOISERS["dit"][1])


def test_conditioning_errors(initialised):
  model, params = initialised["unet2d_class"]
  with pytest.raises(ValueError, match="class-conditional"):
    _shape(model, params, X2, T, None)
  model, params = initialised["unet2d"]
  with pytest.raises(ValueError, match="unconditional"):
    _shape(model, params, X2, T, LABELS)
  model, params = initialised["dit"]
  with pytest.raises(ValueError, match="class labels"):
    _shape(model, params, X4, T, None)
  with pytest.raises(ValueError, match="square"):
    _shape(model, params, X4[:, :, :6], T, LABELS)
  model, params = initialised["unet2d_condition"]
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    _shape(model, params, X4, T, None)


def test_class_labels_change_output(initialised):
  model, params = initialised["unet2d_class"]
  a = _apply(model, params, X2, T, jnp.array([1, 2]))
  b = _apply(model, params, X2, T, jnp.array([1, 10]))
  np.testing.assert_array_equal(a[0], b[0])
  assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 0


def test_autoencoder_kl_methods():
  model, params = _init(AE, (jnp.zeros((1, 16, 16, 1)),))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  mean, logvar = _apply(model, params, x, method=model.encode)
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  z1 = _apply(model, params, x, jax.random.key(5), method=model.sample)
  z2 = _apply(model, params, x, jax.random.key(5), method=model.sample)
  np.testing.assert_array_equal(z1, z2)
  assert float(jnp.max(jnp.abs(z1 - mean))) > 0
  assert _apply(model, params, mean, method=model.decode).shape == (2, 16, 16, 1)
  assert AE.scaling_factor == 0.18215


def test_vq_model_quantizes_to_codebook_with_straight_through_gradient():
  model, params = _init(VQ, (jnp.zeros((1, 16, 16, 3)),))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  h = _apply(model, params, x, method=model.encode)
  assert h.shape == (2, 8, 8, 5)
  q, codes = _apply(model, params, h, method=model.quantize_latents)
  table = params["quantize"]["embedding"]["embedding"]
  np.testing.assert_allclose(q, table[codes], atol=1e-6)
  d = jnp.sum((h[..., None, :] - table) ** 2, -1)
  np.testing.assert_array_equal(codes, jnp.argmin(d, -1))
  quantized_sum = lambda z: jnp.sum(model.apply({"params": params}, z, method=model.quantize_latents)[0] * 3.0)
  g = jax.grad(quantized_sum)(h)
  np.testing.assert_allclose(g, 3.0)
  out = _apply(model, params, x)
  assert out.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(out, _apply(model, params, q, method=model.decode, force_not_quantize=True), atol=1e-5)


# --- configs --------------------------------------------------------------------------------------------------
def test_config_round_trip_and_errors():
  for cfg in (UNET, UNET_CLASS, UNET_COND, DIT, AE, VQ):
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  d = UNET.to_dict()
  with pytest.raises(ValueError, match="unknown config field 'bogus'"):
    UNet2DConfig.from_dict({**d, "bogus": 1})
  assert UNet2DConfig.from_dict({**d, "_class_name": "UNet2DModel", "dropout": 0.1, "act_fn": "silu"}) == UNET
  with pytest.raises(ValueError, match=r"'act_fn' = 'gelu' is not supported.*accepted values: 'silu'"):
    UNet2DConfig.from_dict({**d, "act_fn": "gelu"})
  with pytest.raises(ValueError, match=r"down_block_types has unsupported value 'SkipDownBlock2D'.*AttnDownBlock2D"):
    UNet2DConfig.from_dict({**d, "down_block_types": ["SkipDownBlock2D", "DownBlock2D"]})
  with pytest.raises(ValueError, match="time_embedding_type has unsupported value 'fourier'"):
    UNet2DConfig.from_dict({**d, "time_embedding_type": "fourier"})
  with pytest.raises(ValueError, match="norm_num_groups = 12 does not divide"):
    UNet2DConfig.from_dict({**d, "norm_num_groups": 12})
  c = UNET_COND.to_dict()
  with pytest.raises(ValueError, match="'only_cross_attention' = True is not supported"):
    UNet2DConditionConfig.from_dict({**c, "only_cross_attention": True})
  assert UNet2DConditionConfig.from_dict({**c, "only_cross_attention": [False, False]}) == UNET_COND
  with pytest.raises(ValueError, match="attention_head_dim = .* has 3 entries"):
    UNet2DConditionConfig.from_dict({**c, "attention_head_dim": [2, 2, 2]})
  with pytest.raises(ValueError, match="'norm_type' = 'ada_norm' is not supported"):
    DiTConfig.from_dict({**DIT.to_dict(), "norm_type": "ada_norm"})
  with pytest.raises(ValueError, match="'norm_type' = 'spatial' is not supported.*'group'"):
    VQModelConfig.from_dict({**VQ.to_dict(), "norm_type": "spatial"})


# --- load / export --------------------------------------------------------------------------------------------
def test_key_mapping_is_invertible(initialised):
  for name, (model, params) in initialised.items():
    for k in _flat(params):
      mod, leaf = convert.flax_module_path(convert.diffusers_key(k))
      assert mod == k.rsplit("/", 1)[0], (name, k)
  assert convert.diffusers_key("up_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel") == \
      "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
  assert convert.diffusers_key("proj_out_1/bias") == "proj_out_1.bias"
  assert convert.diffusers_key("time_embedding/linear_1/kernel") == "time_embedding.linear_1.weight"
  assert convert.flax_module_path("mid_block.attentions.0.proj_attn.weight") == ("mid_block/attentions_0/to_out_0",
                                                                                 "weight")


@pytest.mark.parametrize("name", ["unet2d_class", "unet2d_condition", "dit"])
def test_export_load_round_trip(tmp_path, initialised, name):
  cfg, inputs, _ = DENOISERS[name]
  model, params = initialised[name]
  path = convert.export_diffusers(str(tmp_path / name), cfg, params)
  sd = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  if name == "unet2d_class":
    assert sd["conv_in.weight"].shape == (16, 2, 3, 3)  # OIHW
    assert sd["time_embedding.linear_1.weight"].shape == (64, 16)  # (out, in)
    assert "class_embedding.weight" in sd and "down_blocks.1.attentions.0.group_norm.weight" in sd
  model2, params2, cfg2 = models.load_diffusers(path)
  assert cfg2 == cfg and type(model2) is type(model)
  a, b = _flat(params), _flat(params2)
  assert sorted(a) == sorted(b)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  np.testing.assert_array_equal(_apply(model, params, *inputs), _apply(model2, params2, *inputs))


def test_export_autoencoders_round_trip(tmp_path):
  for cfg in (AE, VQ):
    model, params = _init(cfg, (jnp.zeros((1, 16, 16, cfg.in_channels)),))
    path = convert.export_diffusers(str(tmp_path / type(cfg).__name__), cfg, params)
    with open(os.path.join(path, "config.json")) as f:
      assert json.load(f)["_class_name"] == {AE: "AutoencoderKL", VQ: "VQModel"}[cfg]
    _, params2, cfg2 = convert.load_diffusers(path)
    assert cfg2 == cfg
    assert all(np.array_equal(v, _flat(params2)[k]) for k, v in _flat(params).items())


def test_export_is_atomic_and_replaces(tmp_path, initialised):
  model, params = initialised["unet2d"]
  path = tmp_path / "m"
  path.mkdir()
  (path / "stale.txt").write_text("old")
  convert.export_diffusers(str(path), UNET, params)
  assert sorted(os.listdir(path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  assert [n for n in os.listdir(tmp_path)] == ["m"]  # no temporary directories left
  bad = dict(params)
  bad.pop("conv_out")
  with pytest.raises(ValueError, match=r"missing tensors: conv_out/bias; conv_out/kernel"):
    convert.export_diffusers(str(tmp_path / "bad"), UNET, bad)
  assert not (tmp_path / "bad").exists()


def _tamper(path, fn):
  f = os.path.join(path, "diffusion_pytorch_model.safetensors")
  sd = load_file(f)
  fn(sd)
  save_file(sd, f)


def test_load_errors_list_missing_unexpected_and_mismatched(tmp_path, initialised):
  _, params = initialised["unet2d"]
  path = convert.export_diffusers(str(tmp_path / "m"), UNET, params)

  def damage(sd):
    sd.pop("conv_out.bias")
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["conv_in.weight"] = np.zeros((16, 2, 1, 1), np.float32)
  _tamper(path, damage)
  with pytest.raises(ValueError) as e:
    convert.load_diffusers(path)
  msg = str(e.value)
  assert "missing tensors: conv_out/bias" in msg
  assert "unexpected tensors: extra.weight" in msg
  assert "shape mismatches: conv_in.weight: checkpoint (16, 2, 1, 1)" in msg and "vs model (3, 3, 2, 16)" in msg


def test_load_sharded_index_and_file_errors(tmp_path, initialised):
  _, params = initialised["unet2d"]
  path = convert.export_diffusers(str(tmp_path / "m"), UNET, params)
  sd = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  os.remove(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  keys = sorted(sd)
  shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
  for fname, ks in shards.items():
    save_file({k: sd[k] for k in ks}, os.path.join(path, fname))
  with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
  _, params2, _ = convert.load_diffusers(path)
  assert all(np.array_equal(v, _flat(params2)[k]) for k, v in _flat(params).items())
  os.remove(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"))
  with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
    convert.load_diffusers(path)
  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**c, "_class_name": "UNet3DConditionModel"}, f)
  with pytest.raises(ValueError, match="_class_name='UNet3DConditionModel' is not supported; accepted values"):
    convert.load_diffusers(path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load_diffusers(str(tmp_path / "nowhere"))


def test_legacy_transformer2d_dit_config(tmp_path, initialised):
  """DiT checkpoints saved as Transformer2DModel (e.g. facebook/DiT-XL-2-256) load as the DiT."""
  _, params = initialised["dit"]
  path = convert.export_diffusers(str(tmp_path / "dit"), DIT, params)
  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  c.pop("interpolation_scale")
  c.update(_class_name="Transformer2DModel", activation_fn="gelu-approximate", cross_attention_dim=None,
           norm_type="ada_norm_zero", norm_elementwise_affine=False, num_vector_embeds=None, norm_num_groups=32,
           only_cross_attention=False, use_linear_projection=False, upcast_attention=False, dropout=0.0)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)
  model, params2, cfg = convert.load_diffusers(path)
  assert cfg == DIT and isinstance(model, models.DiTTransformer2DModel)
  c.update(norm_type="ada_norm", sample_size=256, patch_size=None)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)
  with pytest.raises(ValueError, match="only DiT-style Transformer2DModel"):
    convert.load_diffusers(path)
