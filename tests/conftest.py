"""Test-wide JAX settings: 8 fake CPU devices (sharding tests) and a persistent compile cache (unit tests
are compile-bound on tiny models, so a rerun is about twice as fast)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# JAX_COMPILATION_CACHE_DIR=<empty dir> measures tests as a fresh clone runs them (cold cache)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
