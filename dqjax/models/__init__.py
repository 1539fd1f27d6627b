"""Plain Flax diffusion models with diffusers' structure and parameter names (no quantization code)."""
from dqjax.models.autoencoder import AutoencoderKL  # noqa: F401
from dqjax.models.configs import AutoencoderKLConfig, DiTConfig, UNet2DConditionConfig, UNet2DConfig  # noqa: F401
from dqjax.models.dit import DiTTransformer2DModel  # noqa: F401
from dqjax.models.layers import Concat, MatMul  # noqa: F401
from dqjax.models.unet import UNet2DConditionModel, UNet2DModel  # noqa: F401
