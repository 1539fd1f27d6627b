r"""The quick benchmark (goal ≤ 5 minutes on 2 CPU cores; 255 s on a fresh clone with a cold compile cache, 2026-12-01): one model (ldm-mnist), the two baselines and
PTQ4DM at W8A8 / W4A8 / W4A4 with small sample counts. The README's main command runs it; the full
method set is the survey suite (configs/bench/survey.py).

  python -m experiments.bench --config=configs/bench/quick.py --workdir=runs/quick
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.title = "dqjax quick benchmark"
  c.models = ("ldm-mnist",)
  c.methods = ("minmax", "mse", "ptq4dm")
  c.settings = ("W8A8", "W4A8", "W4A4")
  c.num_samples = 128
  c.batch_size = 128
  c.calib_samples = 32
  c.calib_steps = 5
  c.calib_policy = "uniform"
  c.seed = 0
  c.save_grids = True
  c.method_overrides = {}
  c.workers = 2          # quantized rows in two processes: one XLA CPU process keeps about one core busy
  return c
