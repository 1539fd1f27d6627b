"""The offline model zoo: small diffusion models trained by dqjax on MNIST-5k and shipped with the package.

  from dqjax import zoo
  entry = zoo.load("ldm-mnist-cond")      # model, params, schedule, sampler, conditioning, decoder
  x0 = entry.generate(jax.random.key(0), 16)

Names (the survey's benchmark settings in miniature):
  ddpm-mnist       pixel U-Net, T=1000 linear schedule (DDPM CIFAR-10 analogue)
  ldm-mnist        latent U-Net over ae-mnist latents, unconditional (LDM LSUN analogue)
  ldm-mnist-cond   latent U-Net, class-conditional, CFG 3.0, DDIM η=0, 20 steps (LDM-4 ImageNet analogue)
  dit-mnist        latent DiT, class-conditional with CFG (DiT-XL/2 analogue)
  sd-mnist         latent U-Net with cross-attention over a tiny caption encoder (Stable Diffusion analogue)
  ae-mnist         the KL autoencoder (32×32×1 → 8×8×4) the latent models use
"""
from dqjax.zoo.registry import DENOISERS, NAMES, SPECS, family_of  # noqa: F401
from dqjax.zoo.entry import ZooEntry, load, load_autoencoder  # noqa: F401
