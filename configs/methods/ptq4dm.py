"""PTQ4DM (arXiv 2211.15736): CPU-sized defaults; the paper/script values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # NDTC: per-sample step positions ~ N(mu, sigma^2) from the end of denoising (script: mu=sigma=0.4,
  # 1024 samples from one batch of DDIM trajectories)
  c.mu = 0.4
  c.sigma = 0.4
  c.num_samples = 256
  c.paper_num_samples = 1024
  c.traj_samples = 64               # FP trajectories regenerated for the draw (when the recipe has an env)
  c.chunk = 8
  c.seed = 0
  # quantizers: per-channel symmetric MSE weights, per-tensor MSE activations, first/last at 8 bits,
  # attention matmuls in float; no reconstruction in the published DNTC script
  c.weight_init = "mse"
  c.act_init = "mse"
  c.eight_bit = ("time_embedding/linear_1", "conv_out")
  c.quantize_matmuls = False
  c.use_adaround = False
  c.recon_iters = 200
  c.recon_qdrop_prob = 0.5          # QDrop's prob (used only with use_adaround)
  c.recon_input_prob = 0.5
  return c
