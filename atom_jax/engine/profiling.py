"""`StepProfiler`: a `jax.profiler` trace over engine steps, each model step marked with
`StepTraceAnnotation("step", step_num=i)` (what `python -m atom_jax.trace report` keys on).
Used by `Engine.start_profile` / `Engine.stop_profile`; not thread-safe (engine thread only)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import jax

from atom_jax.trace.capture import STEP_NAME


class StepProfiler:
    def __init__(self):
        self.log_dir: str | None = None  # set while a trace runs
        self.steps_left: int | None = None  # None: until stop()
        self.step_num = 0

    @property
    def active(self) -> bool:
        return self.log_dir is not None

    def start(self, log_dir: str, steps: int | None = None) -> None:
        if self.active:
            raise ValueError(f"a profiler trace is already running (into {self.log_dir})")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        log_dir = os.path.abspath(os.fspath(log_dir))
        jax.profiler.start_trace(log_dir)  # raises if another trace runs in this process
        self.log_dir, self.steps_left, self.step_num = log_dir, steps, 0

    def stop(self) -> str | None:
        """Stop and write the trace; its log dir, or None when no trace was running."""
        if not self.active:
            return None
        log_dir, self.log_dir, self.steps_left = self.log_dir, None, None
        jax.profiler.stop_trace()
        return log_dir

    @contextlib.contextmanager
    def step(self, wait_for: Callable[[], Any] | None = None) -> Iterator[None]:
        """Wrap one model step; `wait_for()` returns arrays to wait on before the annotation
        ends, so the step's kernels land inside it. Stops the trace after `steps` steps."""
        if not self.active:
            yield
            return
        try:
            with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=self.step_num):
                yield
                if wait_for is not None:
                    jax.block_until_ready(wait_for())
        finally:
            self.step_num += 1
            if self.steps_left is not None:
                self.steps_left -= 1
                if self.steps_left <= 0:
                    self.stop()
