"""BinaryDM (arXiv 2404.05662): CPU-sized defaults; the paper's / code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.steps = 300
  c.batch_size = 8
  c.pool_size = 64                  # FP samples x0 used as the (data-free) training set
  c.order = "forward"
  c.diffusion_weight = 1.0          # the LDM epsilon loss
  c.feature_weight = 1e-4           # LRM weight (paper 1e-4)
  c.feature_loss = "lowrank"
  c.lowrank_frac = 0.25             # q = C / 4
  c.output_weight = 1.0             # epsilon-MSE to the FP teacher (not in the paper; 0 = paper's loss)
  c.order2_levels = None            # None: ceil(levels / 2) (code: levels 0-1 of 4 use two bases)
  c.shortcut_gamma = 0.3
  c.progressive = True
  c.act_init = "mse"
  c.lr_weights = 1e-4
  c.lr_scales = 1e-3
  c.paper_lr = 2e-5                 # base lr (x batch 4 with scale_lr), batch 4, LSUN-Bedrooms training set
  c.paper_training = "LDM trainer on the real training set until convergence"
  c.seed = 0
  return c
