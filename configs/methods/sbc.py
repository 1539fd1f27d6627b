"""SBC (arXiv 2309.01729): defaults (no public code)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.per_head = True                 # one offset per head (False: per layer)
  c.per_step = True                 # one offset per calibration step (False: one for all steps)
  c.weight_init = "mse"
  c.act_init = "mse"
  c.use_adaround = False
  return c
