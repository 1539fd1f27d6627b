"""A-QDiT (arXiv 2406.11100): CPU-sized defaults (no public code; paper values unverified)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.group_size = 32                  # group-wise W (and A); paper value for width 1152 unknown here
  c.act_granularity = "group"        # 'group' (static per channel group) or 'tensor'
  c.calib_step = "auto"              # single-step calibration: 'auto' (least output error) or a fraction 0..1
  c.weight_method = "minmax"
  c.act_method = "minmax"
  c.eval_samples_per_step = 8
  c.keep_fp = ()                     # every layer quantized (as the baselines)
  c.batch_size = None
  return c
