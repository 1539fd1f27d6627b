"""D²-DPM (arXiv 2501.08180): CPU-sized defaults; the paper/code values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # dual denoising: 'deterministic' (D-D², variance absorbed) or 'stochastic' (S-D², variance re-injected);
  # channel-wise Gaussian modelling (the active sampler of the code: channel-wise implicit = D-D²)
  c.variant = "deterministic"
  c.per_channel = True
  c.outlier_std = 4.0
  c.rho_max = 0.9999
  # base quantizer: PTQD's (the repo is a PTQD fork)
  c.weight_init = "mse"
  c.act_init = "mse"
  c.use_adaround = False
  c.recon_iters = 200
  c.paper_recon_iters = 10000
  c.stats_samples = 64
  c.paper_stats_samples = 1024
  return c
