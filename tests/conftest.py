"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
