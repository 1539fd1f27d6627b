r"""Ablation: the U-Net PTQ methods whose default start is per-channel MSE-searched weights, run from min-max
weights instead (everything else as in the survey: same noise, calibration set and sample count).

On ldm-mnist at 4 bits the MSE weight search lowers weight error but raises the one-step ε error and its
shared (sample-independent) part; this suite measures how much of each method's loss to min-max that
explains. The rows go to their own workdir so the survey's default rows stay as they are:

  python -m experiments.bench --config=configs/bench/ablation_minmax_weights.py --workdir=runs/ablation_minmax_weights
"""
from configs.bench import survey

METHODS = ("tdq", "apq_dm", "sbc", "tac_qdm", "q_diffusion", "quest")   # QNCD already starts from min-max weights


def get_config():
  c = survey.get_config()
  c.title = "ablation: MSE-weight methods started from min-max weights"
  c.models = ("ldm-mnist",)
  c.methods = ("minmax",) + METHODS
  c.settings = ("W4A8",)
  c.method_overrides = {m: {"weight_init": "minmax"} for m in METHODS}
  return c
