"""The command-line jobs' persistent compile cache: on by default, off by the environment variable."""
import jax

from dqjax import compile_cache


def test_enable_sets_the_directory_and_off_leaves_jax_alone(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.enable() == "" and jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "xla"))
    assert compile_cache.enable() == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
