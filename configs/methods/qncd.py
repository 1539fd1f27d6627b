"""QNCD (arXiv 2403.19140): CPU-sized defaults; the code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.intra = True                    # embedding-derived smoothing folded into each ResBlock's conv2
  c.min_factor = 1e-2               # floor of |s| relative to max|s|
  c.inter = True                    # re-noising estimate of the quantized model's mean noise
  c.interval = 10                   # --reverse_interval 10
  c.stats_samples = 64
  c.emb_float = False               # --emb_float: time embedding in float
  c.weight_init = "minmax"          # qncd mode: symmetric per-channel 'max' weights
  c.act_init = "mse"
  c.use_adaround = False            # W4 runs resume a BRECQ checkpoint in the code
  return c
