"""Counting XLA compiles (through `jax.monitoring`), so the engine can say when a step
compiled: warm-up logs each bucket's compile, a step that compiles while serving is logged
(a shape warm-up missed), and the profiler does not count such a step as a traced one.

A compile served from the persistent compilation cache is not a compile here: it emits no
backend-compile event."""

from __future__ import annotations

import dataclasses
import threading

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_totals = [0, 0.0]  # compiles, seconds (every thread, the whole process)
_installed = False


@dataclasses.dataclass(frozen=True)
class Compiles:
    count: int = 0
    seconds: float = 0.0

    def __sub__(self, other: "Compiles") -> "Compiles":
        return Compiles(self.count - other.count, self.seconds - other.seconds)

    def __add__(self, other: "Compiles") -> "Compiles":
        return Compiles(self.count + other.count, self.seconds + other.seconds)


def _listen(event: str, duration: float, *args, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _totals[0] += 1
            _totals[1] += duration


def install() -> None:
    """Register the listener once per process."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_listen)


def so_far() -> Compiles:
    """Compiles in this process since `install()`."""
    install()
    with _lock:
        return Compiles(_totals[0], _totals[1])
