"""The platform kernels are built for: this process's backend, or the one named by
`lowering_for` while a program is exported for another platform (`jax.export` with
`platforms=("rocm",)` on a CPU-only machine: the ROCm lowering test).

Kernel code asks `target_platform()` instead of `jax.default_backend()`, so one trace picks
the kernels (and interpret mode or not) of the platform it is lowered for."""

from __future__ import annotations

import contextlib
import threading

import jax

_local = threading.local()


def target_platform() -> str:
    """'cpu', 'gpu' (this process's CUDA or ROCm backend), or a platform named by
    `lowering_for` ('cuda', 'rocm', ...)."""
    return getattr(_local, "platform", None) or jax.default_backend()


def is_cpu() -> bool:
    return target_platform() == "cpu"


def is_rocm() -> bool:
    p = target_platform()
    if p != "gpu":
        return p == "rocm"
    version = getattr(getattr(jax.devices()[0], "client", None), "platform_version", "")
    return "rocm" in str(version).lower()


@contextlib.contextmanager
def lowering_for(platform: str):
    """Trace kernels for `platform` ('cuda' or 'rocm') inside this block (this thread).

    jit's trace cache does not know about this setting, so the caches are cleared on the way
    in and out: a function traced for this process's backend is traced again, and a trace for
    `platform` is not reused afterwards."""
    before = getattr(_local, "platform", None)
    jax.clear_caches()
    _local.platform = platform
    try:
        yield
    finally:
        _local.platform = before
        jax.clear_caches()
