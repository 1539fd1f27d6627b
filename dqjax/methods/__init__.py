"""Quantization methods of the survey, one module per paper, registered by name (see `recipe.py`)."""
import importlib
import pkgutil

_SKIP = {"recipe", "common"}


def load_all() -> None:
  """Import every method module so that its `@register` runs."""
  for info in pkgutil.iter_modules(__path__):
    if info.name not in _SKIP and not info.name.startswith("_"):
      importlib.import_module(f"{__name__}.{info.name}")
