"""BitsFusion (arXiv 2406.04333; no public code): CPU-sized defaults."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.candidates = (1, 2, 3, 4)       # bit widths a layer may take (1 = binary)
  c.target_bits = None              # None: the setting's weight bits (paper: 1.99 bits on average)
  c.sensitivity_samples = 8         # samples per calibration step for the per-layer sensitivity
  c.pool_size = 64
  c.batch_size = 8
  c.steps_stage1 = 200              # CFG-aware output + feature distillation
  c.steps_stage2 = 100              # epsilon-prediction loss
  c.feature_weight = 1.0
  c.uniform_mix = 0.5               # timestep sampling: mix of error-proportional and uniform
  c.lr_weights = 1e-4
  c.lr_scales = 1e-3
  c.paper_training = "SD-1.5 UNet, stage I distillation then stage II noise-prediction fine-tuning"
  c.seed = 0
  return c
