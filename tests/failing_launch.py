"""A runner whose first launch fails (on the dispatch thread when the engine has one; after its
step was prepared, so the host page table already holds the step's rows): for tests of what a
step failing after dispatch leaves behind."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def first_launch_fails(engine, message: str = "launch fell over"):
    real, calls = engine.runner.launch, []

    def flaky(step):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(message)
        return real(step)

    engine.runner.launch = flaky
    try:
        yield
    finally:
        del engine.runner.launch
