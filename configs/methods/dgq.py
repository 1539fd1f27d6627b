"""DGQ (arXiv 2501.04304): CPU-sized defaults; the script's values are noted."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.group_num = 8                   # GROUP_NUM (script: 8 or 16; 1 disables groups)
  c.time_aware = True               # TIME_AWARE_AQTIZER: one table entry per calibration step
  c.log_quant = True                # T2I_LOG_QUANT (attention probabilities)
  c.log_realtime = True             # T2I_REAL_TIME: delta = max of the current prompt's probabilities
  c.start_token = True              # T2I_START_PEAK (cross-attention)
  c.weight_init = "mse"
  c.act_init = "mse"                # fallback per-tensor tables for 2-D inputs
  c.use_adaround = False            # TFMQ's BRECQ/AdaRound weight pass
  return c
