"""`Launcher`: the overlap schedule's dispatch thread (`--dispatch-thread on`). Each step's
`ModelRunner.launch` (the compiled program called on the input block the engine thread packed
with `ModelRunner.prepare`) runs on one worker thread, in submission order, while the engine
thread goes on reading the previous step's tokens, streaming them and planning and packing the
next step. jax releases the GIL while XLA executes a call (on GPU: while it launches the step's
kernels), so the two threads overlap. `fetch()` of a launched step waits for its launch, then
for the device.

Only the launcher thread touches the runner's device state (cache, page table, last output)
while a launch is pending; the engine thread keeps to the runner's host side (`host_inputs`,
`prepare`)."""

from __future__ import annotations

import concurrent.futures

from atom_jax.engine.host_timing import HostClock


class LaunchedStep:
    """A step submitted to the launcher: `fetch()` as `StepResult.fetch()`; an error raised
    by the launch comes out of it."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def fetch(self):
        return self.future.result().fetch()


class Launcher:
    def __init__(self, run):
        """`run(step)` -> StepResult: called on the worker thread (the engine passes a lambda
        that looks up `runner.launch` per call, so a test may replace the runner's method)."""
        self._run = run
        self.clock = HostClock()  # the worker's time per launch (all of it "launch")
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="atom-launch")

    def submit(self, inputs) -> LaunchedStep:
        return LaunchedStep(self._pool.submit(self._launch, inputs))

    def _launch(self, inputs):
        self.clock.start()
        try:
            return self._run(inputs)
        finally:
            self.clock.stop("launch")

    def drain(self) -> None:
        """Wait until every launch submitted so far has run (the thread stays)."""
        self._pool.submit(int).result()

    def close(self) -> None:
        """Wait for pending launches and end the thread."""
        self._pool.shutdown(wait=True)
