"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import atexit
import os
import shutil
import tempfile

# On CPU, XLA's LLVM optimisation is turned down (as test_multihost.py does for its processes):
# the suite's time is mostly compiling small programs that then run a few steps; the HLO passes,
# and so the programs' semantics, are the same. Not on a GPU run (JAX_PLATFORMS set otherwise).
FAST_CPU_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_cpu = os.environ.setdefault("JAX_PLATFORMS", "cpu") == "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + (" " + FAST_CPU_XLA if _cpu else ""))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A CPU run keeps one persistent XLA compilation cache for the whole session, in a fresh
# temporary directory (CI starts from nothing; no run reads another's). Tests build many engines
# whose programs lower to the same HLO, and jax's in-memory cache keys on the Python callable,
# so each new Engine compiled them again; the persistent cache keys on the HLO and the compile
# options, so a repeat is loaded instead. Every compile is cached (the default skips those under
# 1 s). The process keeps the first cache jax opened, this one: an engine given its own
# `compilation_cache_dir` still sets the config (test_engine records that), later compiles
# still land here.
# Under pytest-xdist (`-n 2`) the workers of one run share the cache: the controlling process
# imports this file first, makes the directory and names it in the environment the workers
# inherit; only the process that made it removes it, at its exit (after the workers'). A read
# that meets an entry another worker is still writing fails to load it, and jax then compiles
# (with a warning) instead.
_SHARED_CACHE_ENV = "ATOM_JAX_TESTS_XLA_CACHE"
if _cpu:
    _XLA_CACHE = os.environ.get(_SHARED_CACHE_ENV)
    if not _XLA_CACHE:
        _XLA_CACHE = os.environ[_SHARED_CACHE_ENV] = tempfile.mkdtemp(prefix="atom_jax-tests-xla-cache-")
        atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_collection_modifyitems(config, items):
    on_gpu = any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices())
    if on_gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU (CUDA or ROCm); this run has only CPU devices")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """Engine.warmup freezes the heap (a serving process keeps one engine for its lifetime);
    a test process builds many engines, so each test gives the frozen objects back to the
    collector: a dead engine's reference cycles must not outlive its test."""
    yield
    import gc

    gc.unfreeze()
