"""Capture a profiler trace of N steps, each marked with a step annotation.

    from atom_jax.trace.capture import profile_steps, micro_batch_scope, MB_A, MB_B

    def step_fn(params, batch):
        with micro_batch_scope(MB_A):   # -> ".../mb_a/..." in the HLO op_name metadata
            ...
        with micro_batch_scope(MB_B):
            ...

    run = profile_steps("/tmp/trace", lambda: step(params, batch), steps=5)
    # then: python -m atom_jax.trace report /tmp/trace

The report attributes kernels to a micro-batch by finding ``mb_a`` / ``mb_b`` in
kernel names or in the op_name metadata of the HLO ops they ran, so the scope
names must be used as-is (nesting under other scopes is fine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from atom_jax.trace.categories import LAYER_SCOPE, MICRO_BATCHES

MB_A, MB_B = MICRO_BATCHES
STEP_NAME = "step"  # StepTraceAnnotation name; the loader keys on its step_num stat


def micro_batch_scope(name: str) -> contextlib.AbstractContextManager:
    """``jax.named_scope`` for one TBO micro-batch chain (use inside traced code)."""
    if name not in MICRO_BATCHES:
        raise ValueError(f"micro-batch scope must be one of {MICRO_BATCHES}, got {name!r}")
    return jax.named_scope(name)


def layer_scope(i: int) -> contextlib.AbstractContextManager:
    """``jax.named_scope`` for decoder layer ``i`` (use inside traced code): its ops get
    ``.../layer<i>/...`` in their jaxpr name stack and HLO op_name metadata."""
    return jax.named_scope(LAYER_SCOPE.format(int(i)))


def micro_batch_annotation(name: str) -> jax.profiler.TraceAnnotation:
    """Host-side ``TraceAnnotation`` with a micro-batch name, for Python code that
    dispatches one micro-batch's work (not for code inside ``jit``)."""
    if name not in MICRO_BATCHES:
        raise ValueError(f"micro-batch annotation must be one of {MICRO_BATCHES}, got {name!r}")
    return jax.profiler.TraceAnnotation(name)


@contextlib.contextmanager
def tracing(log_dir: str | Path) -> Iterator[Path]:
    """``jax.profiler.start_trace`` / ``stop_trace`` around the block; stops on errors too."""
    log_dir = Path(log_dir)
    jax.profiler.start_trace(str(log_dir))
    try:
        yield log_dir
    finally:
        jax.profiler.stop_trace()


@dataclasses.dataclass
class ProfiledRun:
    log_dir: Path
    step_seconds: list[float]  # host wall time per step, block_until_ready included
    output: Any  # what the last step returned


def profile_steps(log_dir: str | Path, fn: Callable[[], Any], steps: int, *,
                  warmup: int = 1) -> ProfiledRun:
    """Run ``fn()`` ``warmup`` times untraced (compilation stays out of the trace), then
    ``steps`` times under the profiler, each in ``StepTraceAnnotation("step", step_num=i)``
    and waited on with ``jax.block_until_ready`` so a step's kernels land inside it."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    output = None
    for _ in range(warmup):
        output = jax.block_until_ready(fn())
    times = []
    with tracing(log_dir) as path:
        for i in range(steps):
            t0 = time.perf_counter()
            with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=i):
                output = jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
    return ProfiledRun(path, times, output)
