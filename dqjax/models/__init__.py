"""Plain Flax diffusion models with diffusers' structure and parameter names (no quantization code), and
torch-free loading/export of diffusers model directories (`load_diffusers`, `export_diffusers`)."""
from dqjax.models.autoencoder import AutoencoderKL, VQModel  # noqa: F401
from dqjax.models.configs import (AutoencoderKLConfig, DiTConfig, UNet2DConditionConfig, UNet2DConfig,  # noqa: F401
                                  VQModelConfig)
from dqjax.models.convert import export_diffusers, load_diffusers  # noqa: F401
from dqjax.models.dit import DiTTransformer2DModel  # noqa: F401
from dqjax.models.layers import Attention, Concat, MatMul, ResnetBlock2D  # noqa: F401
from dqjax.models.unet import UNet2DConditionModel, UNet2DModel  # noqa: F401
