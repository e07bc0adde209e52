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


class ProfilerBusy(ValueError):
    """A trace is already running (here, or another jax trace in this process)."""


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
        """ValueError when a trace runs or `log_dir` cannot hold one (checked now, so writing
        the trace at the end does not fail on it)."""
        if self.active:
            raise ProfilerBusy(f"a profiler trace is already running (into {self.log_dir})")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        log_dir = os.path.abspath(os.fspath(log_dir))
        created = not os.path.lexists(log_dir)
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot use {log_dir} for a trace: {e.strerror or e}") from None
        if not os.access(log_dir, os.W_OK | os.X_OK):
            raise ValueError(f"cannot use {log_dir} for a trace: not writable")
        try:
            # No Python function events: they made a few-step trace tens of MB and the report
            # reads none of them (device kernels, step annotations and compile markers stay).
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(log_dir, profiler_options=options)
        except RuntimeError as e:  # another trace runs in this process
            if created:
                os.rmdir(log_dir)  # a refused start leaves nothing behind
            raise ProfilerBusy(str(e)) from None
        self.log_dir, self.steps_left, self.step_num = log_dir, steps, 0

    def stop(self) -> str | None:
        """Stop and write the trace; its log dir, or None when no trace was running. If writing
        fails, the profiler is reset (a new trace can start) and RuntimeError says why."""
        if not self.active:
            return None
        log_dir, self.log_dir, self.steps_left = self.log_dir, None, None
        try:
            jax.profiler.stop_trace()
        except Exception as e:
            _reset_jax_profiler()
            raise RuntimeError(f"writing the trace into {log_dir} failed: {type(e).__name__}: {e}") from e
        return log_dir

    def _stop_after_last_step(self) -> None:
        """Inside a model step: a trace that cannot be written must not fail the step."""
        try:
            log_dir = self.stop()
            log.info("profiler trace written to %s", log_dir)
        except RuntimeError as e:
            log.error("%s; the profiler is reset", e)

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
                        self._stop_after_last_step()


def _reset_jax_profiler() -> None:
    """jax.profiler.stop_trace leaves its session set when exporting fails, so every later
    start_trace would say a trace is running; drop that state (private, hence guarded)."""
    try:
        from jax._src import profiler as jax_profiler

        jax_profiler._profile_state.reset()
    except Exception:  # noqa: BLE001 - a jax without it: nothing more we can do
        log.exception("could not reset jax's profiler state")
