"""BiDM (arXiv 2412.05926): CPU-sized defaults; the paper's / code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.steps = 300
  c.batch_size = 8
  c.pool_size = 64
  c.order = "forward"
  c.diffusion_weight = 1.0
  c.feature_weight = 1e-2           # SPD weight (paper 1e-2)
  c.feature_loss = "spd"
  c.spd_grid = 4                    # 4 x 4 patches
  c.output_weight = 1.0             # epsilon-MSE to the FP teacher (not in the paper; 0 = paper's loss)
  c.shortcut_gamma = 0.3
  c.lr_weights = 1e-4
  c.lr_binarizer = 1e-3
  c.paper_lr = 2e-5                 # batch 4, --scale_lr false
  c.paper_iterations = 200000       # ~200k on one A100 (issue #1)
  c.seed = 0
  return c
