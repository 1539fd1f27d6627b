"""Model configs with diffusers' config.json key names, so a diffusers model directory maps onto them.

`from_dict(d)` sorts every key of a diffusers config into one of four kinds:
- a **field** of the dataclass (it shapes the network dqjax builds);
- a **pinned** key: diffusers has options dqjax does not implement (e.g. `act_fn`, `class_embed_type`);
  the key is accepted only with a value dqjax implements, else a ValueError names the key and the
  accepted values;
- an **ignored** key: it does not change the forward pass in fp32 inference (`dropout`, `upcast_attention`,
  `force_upcast`, `latents_mean`, ...), listed in `IGNORED_KEYS` / each class's `IGNORED`;
- private keys (`_class_name`, `_diffusers_version`, ...) are skipped.
Anything else is an error naming the key and the accepted fields. `to_dict()` gives the fields back with
diffusers' names (tuples as lists), which diffusers' `from_config` accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Union

# Keys that never change the network dqjax builds (training-only, dtype or pipeline-level settings).
IGNORED_KEYS = frozenset({
    "dropout", "upcast_attention", "upcast_softmax", "force_upcast", "latents_mean", "latents_std",
    "num_train_timesteps", "sample_size",
})

IntOrTuple = Union[int, tuple]


def _freeze(v):
  """JSON lists → tuples (recursively) so configs are hashable."""
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


def _same(v, a) -> bool:
  """Equal and of the same kind (False is not 0, None is not False)."""
  return (v is None) == (a is None) and isinstance(v, bool) == isinstance(a, bool) and v == a


def _accepts(value, accepted: tuple) -> bool:
  if isinstance(value, tuple):  # a per-block list of one accepted value (e.g. only_cross_attention)
    return all(_accepts(v, accepted) for v in value)
  return any(_same(value, a) for a in accepted)


class _Config:
  PINNED: ClassVar[dict] = {}
  IGNORED: ClassVar[frozenset] = frozenset()

  @classmethod
  def from_dict(cls, d: dict):
    """The config from a diffusers config.json dict (see the module docstring for the key rules)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
      if k.startswith("_"):
        continue
      v = _freeze(v)
      if k in fields:
        kwargs[k] = v
      elif k in cls.PINNED:
        if not _accepts(v, cls.PINNED[k]):
          raise ValueError(f"{cls.__name__}: config field {k!r} = {v!r} is not supported by dqjax; accepted "
                           f"values: {', '.join(map(repr, cls.PINNED[k]))}")
      elif k not in IGNORED_KEYS and k not in cls.IGNORED:
        raise ValueError(f"{cls.__name__}: unknown config field {k!r}; accepted fields: "
                         f"{', '.join(sorted(fields | set(cls.PINNED)))} (ignored: "
                         f"{', '.join(sorted(IGNORED_KEYS | cls.IGNORED))})")
    return cls(**kwargs)

  def to_dict(self) -> dict:
    def thaw(v):
      return [thaw(x) for x in v] if isinstance(v, tuple) else v
    return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def _check_choice(self, name, accepted):
    values = getattr(self, name)
    for v in (values if isinstance(values, tuple) else (values,)):
      if v not in accepted:
        raise ValueError(f"{type(self).__name__}.{name} has unsupported value {v!r}; accepted values: "
                         f"{', '.join(map(repr, accepted))}")

  def _check_positive(self, *names):
    for name in names:
      values = getattr(self, name)
      for v in (values if isinstance(values, tuple) else (values,)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
          raise ValueError(f"{type(self).__name__}.{name} = {values!r}; accepted values: positive integers")

  def _check_groups(self, groups_name: str, channels: tuple):
    g = getattr(self, groups_name)
    bad = [c for c in channels if c % g]
    if bad:
      raise ValueError(f"{type(self).__name__}.{groups_name} = {g} does not divide block_out_channels {bad}; "
                       f"accepted values: divisors of every entry of block_out_channels")

  def _per_block(self, name: str) -> tuple:
    v = getattr(self, name)
    n = len(self.block_out_channels)
    if isinstance(v, tuple):
      if len(v) != n:
        raise ValueError(f"{type(self).__name__}.{name} = {v!r} has {len(v)} entries; accepted values: one int or "
                         f"{n} ints (one per block)")
      return v
    return (v,) * n


_UNET_PINNED = {
    "act_fn": ("silu", "swish"),
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(_Config):
  """diffusers' UNet2DModel (DDPM, LDM unconditional, class-conditional through `num_class_embeds`)."""
  sample_size: Optional[IntOrTuple] = None
  in_channels: int = 3
  out_channels: int = 3
  center_input_sample: bool = False
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None
  freq_shift: int = 0
  flip_sin_to_cos: bool = True
  down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2D"
  up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  block_out_channels: tuple = (224, 448, 672, 896)
  layers_per_block: int = 2
  mid_block_scale_factor: float = 1.0
  downsample_padding: int = 1
  downsample_type: str = "conv"
  upsample_type: str = "conv"
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "default"
  add_attention: bool = True
  class_embed_type: Optional[str] = None
  num_class_embeds: Optional[int] = None

  PINNED: ClassVar[dict] = {"act_fn": _UNET_PINNED["act_fn"]}

  def __post_init__(self):
    self._check_choice("down_block_types", ("DownBlock2D", "AttnDownBlock2D"))
    self._check_choice("up_block_types", ("UpBlock2D", "AttnUpBlock2D"))
    self._check_choice("mid_block_type", ("UNetMidBlock2D", None))
    for k in ("time_embedding_type", "downsample_type", "upsample_type"):
      self._check_choice(k, _UNET_PINNED[k])
    self._check_choice("resnet_time_scale_shift", ("default", "scale_shift"))
    self._check_choice("class_embed_type", (None,))
    self._check_positive("block_out_channels", "layers_per_block", "norm_num_groups", "in_channels",
                         "out_channels")
    if self.num_class_embeds is not None:
      self._check_positive("num_class_embeds")
    if self.attention_head_dim is not None:
      self._check_positive("attention_head_dim")
    if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels)):
      raise ValueError("UNet2DConfig: down_block_types, up_block_types and block_out_channels must have the same "
                       f"length (got {len(self.down_block_types)}, {len(self.up_block_types)}, "
                       f"{len(self.block_out_channels)})")
    self._check_groups("norm_num_groups", self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  def head_dim(self, channels: int) -> int:
    """diffusers: attention_head_dim, or one head over all channels when it is None."""
    return self.attention_head_dim if self.attention_head_dim is not None else channels


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(_Config):
  """The Stable-Diffusion-style subset of diffusers' UNet2DConditionModel (text cross-attention)."""
  sample_size: Optional[IntOrTuple] = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: IntOrTuple = 1280
  transformer_layers_per_block: IntOrTuple = 1
  attention_head_dim: IntOrTuple = 8   # diffusers' legacy naming: the number of heads of each block
  use_linear_projection: bool = False
  resnet_time_scale_shift: str = "default"
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None

  PINNED: ClassVar[dict] = {
      "act_fn": ("silu", "swish"), "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
      "dual_cross_attention": (False,), "class_embed_type": (None,), "num_class_embeds": (None,),
      "addition_embed_type": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
      "time_cond_proj_dim": (None,), "timestep_post_act": (None,), "time_embedding_act_fn": (None,),
      "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
      "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0), "cross_attention_norm": (None,),
      "attention_type": ("default",), "reverse_transformer_layers_per_block": (None,),
      "num_attention_heads": (None,), "class_embeddings_concat": (False,),
  }
  # only read by diffusers when addition_embed_type is set (pinned to None above)
  IGNORED: ClassVar[frozenset] = frozenset({"addition_time_embed_dim", "addition_embed_type_num_heads"})

  def __post_init__(self):
    self._check_choice("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"))
    self._check_choice("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D"))
    self._check_choice("mid_block_type", ("UNetMidBlock2DCrossAttn",))
    self._check_choice("resnet_time_scale_shift", ("default", "scale_shift"))
    self._check_choice("time_embedding_type", ("positional",))
    self._check_positive("block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim",
                         "transformer_layers_per_block", "attention_head_dim", "in_channels", "out_channels")
    if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels)):
      raise ValueError("UNet2DConditionConfig: down_block_types, up_block_types and block_out_channels must have "
                       "the same length")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
      self._per_block(name)
    self._check_groups("norm_num_groups", self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  def heads(self) -> tuple:
    """Attention heads of each down block (diffusers reads them from `attention_head_dim`)."""
    return self._per_block("attention_head_dim")

  def per_block(self, name: str) -> tuple:
    return self._per_block(name)


@dataclasses.dataclass(frozen=True)
class DiTConfig(_Config):
  """diffusers' DiTTransformer2DModel (also legacy `Transformer2DModel` DiT checkpoints)."""
  sample_size: int = 32
  in_channels: int = 4
  out_channels: Optional[int] = None
  patch_size: int = 2
  num_layers: int = 28
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  num_embeds_ada_norm: int = 1000
  norm_eps: float = 1e-5
  attention_bias: bool = True
  interpolation_scale: float = 1.0

  PINNED: ClassVar[dict] = {
      "activation_fn": ("gelu-approximate",), "norm_type": ("ada_norm_zero",), "norm_elementwise_affine": (False,),
      # keys of legacy Transformer2DModel DiT checkpoints
      "cross_attention_dim": (None,), "num_vector_embeds": (None,), "only_cross_attention": (False,),
      "double_self_attention": (False,), "use_linear_projection": (False,), "attention_type": ("default",),
      "caption_channels": (None,), "use_additional_conditions": (None, False),
  }
  IGNORED: ClassVar[frozenset] = frozenset({"norm_num_groups"})  # unused by the patched DiT

  def __post_init__(self):
    self._check_positive("sample_size", "in_channels", "patch_size", "num_layers", "num_attention_heads",
                         "attention_head_dim", "num_embeds_ada_norm")
    if self.out_channels is not None:
      self._check_positive("out_channels")
    if self.sample_size % self.patch_size:
      raise ValueError(f"DiTConfig.sample_size = {self.sample_size} is not a multiple of patch_size "
                       f"{self.patch_size}; accepted values: multiples of patch_size")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out(self) -> int:
    return self.out_channels if self.out_channels is not None else self.in_channels


_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(_Config):
  """diffusers' AutoencoderKL (the LDM / Stable Diffusion VAE)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  down_block_types: tuple = ("DownEncoderBlock2D",)
  up_block_types: tuple = ("UpDecoderBlock2D",)
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  PINNED: ClassVar[dict] = {"act_fn": ("silu", "swish")}

  def __post_init__(self):
    for k, v in _VAE_BLOCKS.items():
      self._check_choice(k, v)
    self._check_positive("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels",
                         "in_channels", "out_channels")
    if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels)):
      raise ValueError(f"{type(self).__name__}: down_block_types, up_block_types and block_out_channels must have "
                       "the same length")
    self._check_groups("norm_num_groups", self.block_out_channels)


@dataclasses.dataclass(frozen=True)
class VQModelConfig(_Config):
  """diffusers' VQModel (the LDM VQ-f4 autoencoders): encoder, codebook `quantize`, decoder."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 3
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  down_block_types: tuple = ("DownEncoderBlock2D",)
  up_block_types: tuple = ("UpDecoderBlock2D",)
  norm_num_groups: int = 32
  sample_size: int = 32
  num_vq_embeddings: int = 256
  vq_embed_dim: Optional[int] = None
  scaling_factor: float = 0.18215
  mid_block_add_attention: bool = True

  PINNED: ClassVar[dict] = {"act_fn": ("silu", "swish"), "norm_type": ("group",)}
  # only used by decode(force_not_quantize=True) with codebook indices, which dqjax does not offer
  IGNORED: ClassVar[frozenset] = frozenset({"lookup_from_codebook"})

  def __post_init__(self):
    AutoencoderKLConfig.__post_init__(self)
    self._check_positive("num_vq_embeddings")

  @property
  def embed_dim(self) -> int:
    return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels


CONFIG_CLASSES: dict[str, Any] = {
    "UNet2DModel": UNet2DConfig, "UNet2DConditionModel": UNet2DConditionConfig,
    "DiTTransformer2DModel": DiTConfig, "AutoencoderKL": AutoencoderKLConfig, "VQModel": VQModelConfig,
}
