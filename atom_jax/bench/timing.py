"""Timing helpers shared by the GPU benchmarks (warm-up, then medians; see the device
method notes: device work is asynchronous, so every timed call is synchronised). The ceilings
(`device_ceilings`) take the best batch instead (`best_time`), since session 22: they read higher
than the medians did, so a share of them (a FLOP floor's, "of copy") reads lower at the same speed."""

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


def back_to_back_time(fn, inputs=(None,), iters: int = 20, warmup: int = 2, repeats: int = 3, stat=statistics.median):
    """Seconds per call when `iters` calls are queued back to back (dispatch hidden behind the
    device), `stat` (median) over `repeats` batches: for kernels short enough that launch gaps matter."""
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
    return stat(per_call)


def best_time(fn, inputs=(None,), iters: int = 20, repeats: int = 5, warmup_s: float = 0.0):
    """Seconds per call at the fastest of `repeats` back-to-back batches of `iters` calls, after
    calling fn for at least `warmup_s` seconds (a GPU's clocks ramp up from idle): a ceiling's
    estimate, where a median would carry the ramp and the batch-to-batch spread into it."""
    inputs = list(inputs)
    t_end = time.perf_counter() + warmup_s
    i = 0
    while i < 2 or time.perf_counter() < t_end:
        jax.block_until_ready(fn(inputs[i % len(inputs)]))
        i += 1
    return back_to_back_time(fn, inputs, iters=iters, warmup=0, repeats=repeats, stat=min)


def device_ceilings():
    """Measured copy bandwidth (bytes read + written) and dense bf16 n^3 matmul rate: 1 GiB and
    n = 8192 on an accelerator, 64 MiB and n = 1024 on CPU (smoke runs); each the best of 5
    batches after 0.5 s of warm-up on an accelerator. Until session 22 the matmul was the median of
    3 batches of 10 after 2 calls: one H200 measured 770-798 TFLOP/s from one process to the next
    while the 128K prefill's device time stayed within 1%. The best-of timer reads higher and
    spreads less, but the rate also falls as the card heats: three readings in one process, back
    to back, 783 / 745 / 733 TFLOP/s (the median timer: 767 / 697 / 668; docs/benchmarks.md,
    session 22). A floor from it is as steady as the card's state when the bench starts."""
    cpu = jax.default_backend() == "cpu"
    repeats, warmup_s = (3, 0.0) if cpu else (5, 0.5)
    x = jnp.ones((1 << (25 if cpu else 29),), jnp.bfloat16) * 1.5
    copy = jax.jit(lambda v: v * 1.0001)
    copy_s = best_time(copy, [x], iters=20, repeats=repeats, warmup_s=warmup_s)
    n = 1024 if cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda v: v @ v)
    mm_s = best_time(mm, [a], iters=5 if cpu else 20, repeats=repeats, warmup_s=warmup_s)
    return {"copy_GBps": 2 * x.nbytes / copy_s / 1e9, "matmul_TFLOPs": 2 * n ** 3 / mm_s / 1e12}
