"""Counting XLA compiles (through `jax.monitoring`), so the engine can say when a step
compiled: warm-up logs each bucket's compile, a step that compiles while serving is logged
(a shape warm-up missed), and the profiler does not count such a step as a traced one.

jax reports every executable it builds, whether compiled or loaded from the persistent
compilation cache (then also a cache hit): both are counted, the loads also in `cached`."""

from __future__ import annotations

import dataclasses
import threading

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"count": 0, "cached": 0, "seconds": 0.0}  # every thread, the whole process
_installed = False


@dataclasses.dataclass(frozen=True)
class Compiles:
    count: int = 0  # executables built: compiled, or loaded from the persistent cache
    cached: int = 0  # of those, loaded from the persistent cache
    seconds: float = 0.0

    def __sub__(self, other: "Compiles") -> "Compiles":
        return Compiles(self.count - other.count, self.cached - other.cached,
                        self.seconds - other.seconds)

    def __add__(self, other: "Compiles") -> "Compiles":
        return Compiles(self.count + other.count, self.cached + other.cached,
                        self.seconds + other.seconds)

    def describe(self) -> str:
        """'compiled 2 XLA programs in 6.1 s' / '... (1 from the compilation cache)'."""
        text = f"compiled {self.count} XLA program(s) in {self.seconds:.1f} s"
        if self.cached:
            text += f" ({self.cached} loaded from the compilation cache)"
        return text


def _on_duration(event: str, duration: float, *args, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _totals["count"] += 1
            _totals["seconds"] += duration


def _on_event(event: str, *args, **kwargs) -> None:
    if event == CACHE_HIT_EVENT:
        with _lock:
            _totals["cached"] += 1


def install() -> None:
    """Register the listeners once per process."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def so_far() -> Compiles:
    """Executables built in this process since `install()`."""
    install()
    with _lock:
        return Compiles(**_totals)
