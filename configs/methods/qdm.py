"""Q-DM (NeurIPS 2023; no public code): CPU-sized defaults."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.steps = 300
  c.batch_size = 8
  c.pool_size = 64                  # FP samples x0 used as the (data-free) training set
  c.order = "forward"               # x_t = q_sample(x0, t, eps), t ~ U{0..T-1}
  c.diffusion_weight = 1.0          # the QAT epsilon loss
  c.output_weight = 1.0             # NeM: ||eps_FP - eps_Q||^2
  c.first_last_bits = 8
  c.taq_pattern = ".*"              # ops whose activations get timestep-aware standardisation
  c.weight_init = "mse"
  c.lr_weights = 1e-5               # latent float weights (STE)
  c.lr_scales = 1e-3                # LSQ steps of weights and activations
  c.paper_training = "full QAT on the training set (CIFAR-10 / LSUN / ImageNet-64 DDPM/DDIM), W=A in {2,3,4}"
  c.seed = 0
  return c
