"""`StepProfiler`: wraps every model step. It notes steps that compiled (logged; counted in
`compiles`), and while a `jax.profiler` trace runs it marks each step with
`StepTraceAnnotation("step", step_num=i)` (what `python -m atom_jax.trace report` keys on).
A trace of N steps runs until N steps that did not compile were traced (the report flags the
ones that did). Used by `Engine.start_profile` / `Engine.stop_profile`; not thread-safe
(engine thread only)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

import jax

from atom_jax.engine import compiles as compile_count
from atom_jax.trace.capture import STEP_NAME

log = logging.getLogger("atom_jax.engine")


class StepProfiler:
    def __init__(self):
        self.log_dir: str | None = None  # set while a trace runs
        self.steps_left: int | None = None  # None: until stop()
        self.step_num = 0
        self.compiles = compile_count.Compiles()  # compiles inside model steps, this engine
        self.last_step_compiles = compile_count.Compiles()
        compile_count.install()

    @property
    def active(self) -> bool:
        return self.log_dir is not None

    def start(self, log_dir: str, steps: int | None = None) -> None:
        if self.active:
            raise ValueError(f"a profiler trace is already running (into {self.log_dir})")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        log_dir = os.path.abspath(os.fspath(log_dir))
        # No Python function events: they made a few-step trace tens of MB and the report
        # reads none of them (device kernels, step annotations and compile markers stay).
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
        # raises if another trace runs in this process
        jax.profiler.start_trace(log_dir, profiler_options=options)
        self.log_dir, self.steps_left, self.step_num = log_dir, steps, 0

    def stop(self) -> str | None:
        """Stop and write the trace; its log dir, or None when no trace was running."""
        if not self.active:
            return None
        log_dir, self.log_dir, self.steps_left = self.log_dir, None, None
        jax.profiler.stop_trace()
        return log_dir

    @contextlib.contextmanager
    def step(self, wait_for: Callable[[], Any] | None = None, what: str = "step") -> Iterator[None]:
        """Wrap one model step; `wait_for()` returns arrays to wait on before the annotation
        ends, so the step's kernels land inside it. Stops the trace after `steps` steps that
        did not compile. `what` names the step in the compile log line."""
        before = compile_count.so_far()
        try:
            if not self.active:
                yield
            else:
                with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=self.step_num):
                    yield
                    if wait_for is not None:
                        jax.block_until_ready(wait_for())
        finally:
            new = self.last_step_compiles = compile_count.so_far() - before
            if new.count:
                self.compiles += new
                log.info("%s: %s", what, new.describe())
            if self.active:
                self.step_num += 1
                if self.steps_left is not None and not new.count:
                    self.steps_left -= 1
                    if self.steps_left <= 0:
                        self.stop()
