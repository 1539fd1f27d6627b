"""Model configs with diffusers' config.json key names, so a diffusers model directory maps onto them.

`from_dict` ignores private keys ('_class_name', '_diffusers_version', ...) and a documented list of keys
that do not change the network dqjax builds; any other unknown key is an error naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Keys diffusers writes that do not affect the forward pass dqjax implements (or only select defaults).
IGNORED_KEYS = frozenset({
    "act_fn", "center_input_sample", "add_attention", "dropout", "resnet_time_scale_shift", "upcast_attention",
    "only_cross_attention", "dual_cross_attention", "class_embeddings_concat", "mid_block_type",
    "mid_block_only_cross_attention", "time_cond_proj_dim", "timestep_post_act", "time_embedding_act_fn",
    "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim", "resnet_skip_time_act",
    "resnet_out_scale_factor", "cross_attention_norm", "addition_embed_type", "addition_time_embed_dim",
    "addition_embed_type_num_heads", "encoder_hid_dim", "encoder_hid_dim_type", "attention_type",
    "reverse_transformer_layers_per_block", "transformer_layers_per_block", "num_attention_heads",
    "time_embedding_dim", "attn_norm_num_groups", "mid_block_add_attention", "force_upcast",
    "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv", "shift_factor",
    "upcast_softmax", "num_vq_embeddings_groups", "lookup_from_codebook", "vq_embed_dim",
    "norm_elementwise_affine", "activation_fn", "norm_type", "attention_bias", "upcast_attention",
    "num_train_timesteps", "norm_num_groups", "time_embedding_type", "class_embed_type", "num_class_embeds",
})


class _Config:
  @classmethod
  def from_dict(cls, d: dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
      if k.startswith("_"):
        continue
      if k in fields:
        kwargs[k] = tuple(v) if isinstance(v, list) else v
      elif k not in IGNORED_KEYS:
        raise ValueError(f"{cls.__name__}: unknown config field {k!r}; accepted fields: {', '.join(sorted(fields))}")
    return cls(**kwargs)

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def _check_choice(self, name, accepted):
    values = getattr(self, name)
    for v in (values if isinstance(values, tuple) else (values,)):
      if v not in accepted:
        raise ValueError(f"{type(self).__name__}.{name} has unsupported value {v!r}; accepted values: "
                         f"{', '.join(map(str, accepted))}")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(_Config):
  sample_size: Optional[int] = None
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (224, 448, 672, 896)
  layers_per_block: int = 2
  down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
  up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  downsample_type: str = "conv"
  upsample_type: str = "conv"
  time_embedding_type: str = "positional"
  mid_block_scale_factor: float = 1.0
  class_embed_type: Optional[str] = None
  num_class_embeds: Optional[int] = None

  def __post_init__(self):
    self._check_choice("down_block_types", ("DownBlock2D", "AttnDownBlock2D"))
    self._check_choice("up_block_types", ("UpBlock2D", "AttnUpBlock2D"))
    self._check_choice("time_embedding_type", ("positional",))
    self._check_choice("downsample_type", ("conv",))
    self._check_choice("upsample_type", ("conv",))
    self._check_choice("class_embed_type", (None,))
    if len(self.down_block_types) != len(self.block_out_channels):
      raise ValueError("UNet2DConfig: down_block_types and block_out_channels must have the same length")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(_Config):
  sample_size: Optional[int] = None
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  attention_head_dim: Any = 8          # diffusers' legacy naming: the number of heads
  cross_attention_dim: int = 1280
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  use_linear_projection: bool = False
  mid_block_scale_factor: float = 1.0

  def __post_init__(self):
    self._check_choice("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"))
    self._check_choice("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D"))


@dataclasses.dataclass(frozen=True)
class DiTConfig(_Config):
  sample_size: int = 32
  in_channels: int = 4
  out_channels: Optional[int] = None
  patch_size: int = 2
  num_layers: int = 28
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  num_embeds_ada_norm: int = 1000
  norm_eps: float = 1e-5
  dropout: float = 0.0

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out(self) -> int:
    return self.out_channels if self.out_channels is not None else self.in_channels


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(_Config):
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

  def __post_init__(self):
    self._check_choice("down_block_types", ("DownEncoderBlock2D",))
    self._check_choice("up_block_types", ("UpDecoderBlock2D",))
