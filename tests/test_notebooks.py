"""Every Colab notebook runs top to bottom (small settings); a cell error fails the test."""
import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colab")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("DQJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # the kernel shares the tests' compile cache (conftest): it runs programs the unit tests compiled already
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                     str(jax.config.jax_persistent_cache_min_compile_time_secs))
  # one BLAS thread: the kernel runs in place of this test process, about one core under `pytest -n 2`, and a
  # multi-threaded sFID eigendecomposition (1792²) on a busy core is several times slower, not faster
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
