"""What each zoo model is: architecture (diffusers config keys), schedule, sampler, conditioning.

Sizes are chosen so that every model trains in minutes and samples in seconds on 2 CPU cores while
keeping the structure the survey's methods target (residual blocks, attention and QKᵀ/softmax·V, skip
concatenations, time embedding, adaLN for the DiT, cross-attention for the text model).
"""
from __future__ import annotations

NAMES = ("ddpm-mnist", "ldm-mnist", "ldm-mnist-cond", "dit-mnist", "sd-mnist")
AUTOENCODER = "ae-mnist"
DENOISERS = NAMES

_UNET_LATENT = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=16, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, time_embedding_type="positional")

SPECS = {
    "ae-mnist": dict(
        kind="autoencoder_kl", family="autoencoder",
        model=dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=[16, 32, 32],
                   layers_per_block=1, norm_num_groups=8, sample_size=32,
                   down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3),
        train=dict(steps=1500, batch_size=32, lr=2e-3, kl_weight=1e-6, ema=0.99)),
    "ddpm-mnist": dict(
        kind="unet2d", family="unet", latent=False, cond="none",
        model=dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=[16, 32],
                   layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                   up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=16, norm_num_groups=8,
                   norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                   time_embedding_type="positional"),
        schedule=dict(kind="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02),
        sampler=dict(name="ddim", num_steps=25, eta=0.0, timestep_spacing="quad"),
        guidance_scale=1.0,
        train=dict(steps=3000, batch_size=32, lr=2e-3, ema=0.995)),
    "ldm-mnist": dict(
        kind="unet2d", family="unet", latent=True, cond="none", model=dict(_UNET_LATENT),
        schedule=dict(kind="scaled_linear", num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195),
        sampler=dict(name="ddim", num_steps=20, eta=0.0, timestep_spacing="leading"),
        guidance_scale=1.0,
        train=dict(steps=3000, batch_size=64, lr=2e-3, ema=0.995)),
    "ldm-mnist-cond": dict(
        kind="unet2d", family="unet", latent=True, cond="class",
        model=dict(_UNET_LATENT, num_class_embeds=11),
        schedule=dict(kind="scaled_linear", num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195),
        sampler=dict(name="ddim", num_steps=20, eta=0.0, timestep_spacing="leading"),
        guidance_scale=3.0, num_classes=10,
        train=dict(steps=3000, batch_size=64, lr=2e-3, ema=0.995, cond_drop=0.1)),
    "dit-mnist": dict(
        kind="dit", family="dit", latent=True, cond="class",
        model=dict(sample_size=8, in_channels=4, out_channels=4, patch_size=2, num_layers=4,
                   num_attention_heads=3, attention_head_dim=32, num_embeds_ada_norm=10, norm_eps=1e-6),
        schedule=dict(kind="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02),
        sampler=dict(name="ddim", num_steps=20, eta=0.0, timestep_spacing="leading"),
        guidance_scale=3.0, num_classes=10,
        train=dict(steps=8000, batch_size=64, lr=1.5e-3, ema=0.995, cond_drop=0.1)),
    "sd-mnist": dict(
        kind="unet2d_condition", family="unet_text", latent=True, cond="text",
        model=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                   layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4,
                   cross_attention_dim=64, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True,
                   freq_shift=0, downsample_padding=1),
        text_encoder=dict(width=64, layers=2, heads=4, max_len=4),
        schedule=dict(kind="scaled_linear", num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195),
        sampler=dict(name="plms", num_steps=20, eta=0.0, timestep_spacing="leading"),
        guidance_scale=3.0,
        train=dict(steps=3000, batch_size=64, lr=2e-3, ema=0.995, cond_drop=0.1)),
}


def family_of(name: str) -> str:
  if name not in SPECS:
    raise ValueError(f"unknown zoo model {name!r}; accepted values: {', '.join(SPECS)}")
  return SPECS[name]["family"]
