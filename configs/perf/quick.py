r"""Quick performance benchmark (≤ 3 minutes of CPU on 2 cores): one model, fewer steps and modes.

  python -m experiments.perf --config=configs/perf/quick.py
"""
from configs.perf import default


def get_config():
  c = default.get_config()
  c.config_path = "configs/perf/quick.py"
  c.out_dir = "runs/perf_quick"
  c.ratio_file = "runs/perf_quick/perf/ratios.json"
  c.benchmarks = ("calibration", "sampling", "memory", "scaling")
  c.repeats = 2
  c.calib_models = ("dit-mnist",)
  c.calib_samples = 8
  c.calib_steps = 4
  c.eager_channel_fraction = 0.01
  c.sample_models = ("dit-mnist",)
  c.sample_modes = ("fp", "sim-W8A8", "deploy-int8", "deploy-int4")
  c.sample_batch = 8
  c.scale_model = "dit-mnist"
  c.scale_samples = (4, 8, 16)
  c.scale_steps = 2
  c.scale_widths = (16, 32, 48)
  c.scale_width_samples = 4
  c.scale_repeats = 1
  return c
