"""Writes the Colab notebooks from their cell sources (run after editing: python colab/make_notebooks.py)."""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''# Colab: install dqjax from its repository (skipped when dqjax is already importable, e.g. in CI).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("dqjax") is None:
    repo = os.environ.get("DQJAX_REPO", "https://github.com/dqjax/dqjax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{repo}"], check=True)
# Small settings when SMALL=1 (CI runs every notebook this way).
SMALL = os.environ.get("DQJAX_NOTEBOOK_SMALL", "0") == "1"
'''

QUICKSTART = [
    ("md", "# dqjax quickstart\nLoad a shipped zoo model, quantize it to W4A8 with a recipe in a few lines, "
           "sample from the same noise as the FP model and compare."),
    ("code", INSTALL),
    ("code", '''import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from dqjax import zoo, metrics
from dqjax.methods import recipe
from dqjax.benchmark import runner, report

entry = zoo.load("ldm-mnist-cond")          # class-conditional latent U-Net, CFG 3.0, DDIM 20 steps
suite = runner.SuiteConfig(models=(entry.name,), methods=("mse",), settings=("W4A8",),
                           calib_samples=8 if SMALL else 32, calib_steps=3 if SMALL else 10)
calib = runner.calibration_data(entry, suite, jax.random.key(0))   # the FP model's own trajectories
print(calib.xs.shape, "calibration inputs (steps, samples, H, W, C)")'''),
    ("code", '''qm = recipe.build("mse")(entry.model, entry.params, entry.example_args(2), calib, w_bits=4, a_bits=8,
                         model_family=entry.family, env=entry.env())
print(qm.plan.table()[:1500])'''),
    ("code", '''n = 8 if SMALL else 32
key = jax.random.key(1)
fp_imgs, labels = entry.generate(key, n)
q_imgs, _ = entry.generate(key, n, denoise=qm.denoiser())
print("PSNR vs FP: %.2f dB, SSIM %.3f" % (metrics.psnr(q_imgs, fp_imgs), metrics.ssim(q_imgs, fp_imgs)))
fig, ax = plt.subplots(2, 1, figsize=(8, 2.4))
for a, imgs, title in zip(ax, (fp_imgs, q_imgs), ("FP", "W4A8 (mse)")):
    a.imshow(report.grid(np.asarray(imgs[:8]))[..., 0], cmap="gray"); a.set_title(title); a.axis("off")
plt.show()'''),
]

BENCHMARK = [
    ("md", "# dqjax benchmark\nRun a benchmark suite on the zoo and show the survey-style table."),
    ("code", INSTALL),
    ("code", '''import tempfile
from IPython.display import Markdown, display
from configs.bench import quick
from dqjax.benchmark import report, runner
cfg = quick.get_config()
if SMALL:
    cfg.settings = ("W8A8",); cfg.methods = ("minmax",); cfg.num_samples = 8; cfg.batch_size = 8
    cfg.calib_samples = 8; cfg.calib_steps = 2
suite = runner.suite_from_config(cfg)
workdir = tempfile.mkdtemp()
rows = runner.run_suite(suite, workdir)
display(Markdown("### Which method wins (paired PSNR vs FP / FID)\\n\\n" + report.winners_table(rows)))
display(Markdown(report.markdown_table(rows)))
display(Markdown("### Where the time goes (process-minutes per model)\\n\\n" + report.cost_table(rows)))'''),
]

ANALYSIS = [
    ("md", "# dqjax error analysis\nActivation ranges drift over timesteps (why timestep-aware quantization), "
           "errors accumulate along the trajectory, and some layers are far more sensitive than others."),
    ("code", INSTALL),
    ("code", '''import jax, numpy as np
import matplotlib.pyplot as plt
from dqjax import zoo
from dqjax.analysis import errors
from dqjax.benchmark import runner
from dqjax.methods import recipe
entry = zoo.load("ldm-mnist")
suite = runner.SuiteConfig(models=(entry.name,), methods=("minmax",), settings=("W4A8",),
                           calib_samples=8 if SMALL else 32, calib_steps=20, calib_policy="all")
calib = runner.calibration_data(entry, suite, jax.random.key(0))
qm = recipe.build("minmax")(entry.model, entry.params, entry.example_args(2), calib, w_bits=4, a_bits=8,
                            model_family=entry.family, env=entry.env())
ranges = errors.activation_ranges_over_time(qm, calib)
top = sorted(ranges, key=lambda p: -float(np.ptp(ranges[p][2])))[:5]
path = errors.plot_activation_ranges({p: ranges[p] for p in top}, "/tmp/ranges.png")
plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()'''),
    ("code", '''small = calib.select_steps(np.arange(0, calib.num_steps, 5))
sens = errors.layer_sensitivity(qm, small, max_layers=3 if SMALL else None)
print(errors.sensitivity_table(sens[:10]))'''),
]


def write(name, cells):
  nb = nbf.v4.new_notebook()
  nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
  for i, cell in enumerate(nb.cells):
    cell.id = f"{name}-{i}"             # stable ids: regenerating an unchanged notebook changes nothing
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nbf.write(nb, os.path.join(HERE, f"{name}.ipynb"))


NOTEBOOKS = {"quickstart": QUICKSTART, "benchmark": BENCHMARK, "analysis": ANALYSIS}

if __name__ == "__main__":
  for name, cells in NOTEBOOKS.items():
    write(name, cells)
