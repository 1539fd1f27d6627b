r"""The full offline survey tables: unconditional (ldm-mnist, ddpm-mnist), class-conditional
(ldm-mnist-cond, dit-mnist) and text-conditional (sd-mnist) models, every registered method, W8A8 / W4A8 /
W4A4. Goal ≤ 60 minutes on 2 CPU cores.

  python -m experiments.bench --config=configs/bench/survey.py --workdir=runs/survey
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.title = "dqjax survey benchmark (offline zoo)"
  c.models = ("ldm-mnist", "ldm-mnist-cond", "sd-mnist", "ddpm-mnist", "dit-mnist")
  c.methods = ("all",)
  c.settings = ("W8A8", "W4A8", "W4A4")
  c.num_samples = 256
  c.batch_size = 256
  c.calib_samples = 32
  c.calib_steps = 10
  c.calib_policy = "uniform"
  c.seed = 0
  c.save_grids = True
  c.method_overrides = {}
  c.workers = 2          # quantized rows in two processes: one XLA CPU process keeps about one core busy
  return c
