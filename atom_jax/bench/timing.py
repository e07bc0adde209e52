"""Timing helpers shared by the GPU benchmarks (warm-up, then medians; see the device
method notes: device work is asynchronous, so every timed call is synchronised)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_time(fn, inputs=(None,), iters: int = 10, warmup: int = 2):
    """(median, min) seconds per call of fn(x), cycling through `inputs`, after `warmup` calls."""
    inputs = list(inputs)
    for i in range(warmup):
        jax.block_until_ready(fn(inputs[i % len(inputs)]))
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(inputs[i % len(inputs)]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def back_to_back_time(fn, inputs=(None,), iters: int = 20, warmup: int = 2, repeats: int = 3):
    """Seconds per call when `iters` calls are queued back to back (dispatch hidden behind the
    device), median over `repeats` batches: for kernels short enough that launch gaps matter."""
    inputs = list(inputs)
    for i in range(warmup):
        jax.block_until_ready(fn(inputs[i % len(inputs)]))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(inputs[i % len(inputs)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return statistics.median(per_call)


def device_ceilings():
    """Measured copy bandwidth (bytes read + written) and dense bf16 n^3 matmul rate: 1 GiB and
    n = 8192 on an accelerator, 64 MiB and n = 1024 on CPU (smoke runs)."""
    cpu = jax.default_backend() == "cpu"
    x = jnp.ones((1 << (25 if cpu else 29),), jnp.bfloat16) * 1.5
    copy = jax.jit(lambda v: v * 1.0001)
    copy_s = back_to_back_time(copy, [x], iters=20)
    n = 1024 if cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda v: v @ v)
    mm_s = back_to_back_time(mm, [a], iters=10)
    return {"copy_GBps": 2 * x.nbytes / copy_s / 1e9, "matmul_TFLOPs": 2 * n ** 3 / mm_s / 1e12}
