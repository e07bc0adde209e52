"""The host side of a GPU trace's device events: when the host launched each one, and which execution
of a compiled program launched it.

A kernel or copy carries the correlation id of the host API call that launched it (``cuLaunchKernel``,
``cuGraphLaunch``, ``cuMemsetAsync``: an event with the same ``correlation_id`` on a host thread
line). That call runs inside PjRt's execute of the program, an event with a ``run_id`` stat on the
same thread. The host does not wait for the device: an 8192-token prefill chunk on an H200 launched
all its kernels within its 27 ms step annotation while they ran for 48 ms, so a kernel belongs to the
step that launched it, not to the one it happened to run in, and one execution of a program is every
kernel it launched (several command buffers, and the thunks between them), not one graph launch.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Launch:
    host_ns: float  # when the host call that launched it began
    run_id: int | None  # the PjRt execution it was launched in (None: outside any)


@dataclasses.dataclass
class HostLaunches:
    by_correlation: dict[tuple, Launch]  # (context_id, correlation_id) -> its launch
    # (run_id, device_id) -> the correlation ids launched in that run for that device: a run whose
    # device events lack one was cut by the end of the capture
    by_run: dict[tuple, set]

    def of(self, stats) -> Launch | None:
        corr = stats.get("correlation_id")
        if corr in (None, ""):
            return None
        return self.by_correlation.get((stats.get("context_id"), corr))


def _runs(events: list) -> dict[tuple, tuple[list[float], list[tuple[float, int]]]]:
    """Per host line, the PjRt executions on it: starts (sorted) and (end, run_id); events of one
    run_id on a line (nested execute scopes) make one span, so the spans of a line do not overlap."""
    spans: dict[tuple, dict] = {}
    for r in events:
        if "run_id" in r.stats and r.dur_ns > 0:
            line = spans.setdefault((r.plane, r.line), {})
            a, b = line.get(r.stats["run_id"], (r.start_ns, r.start_ns + r.dur_ns))
            line[r.stats["run_id"]] = min(a, r.start_ns), max(b, r.start_ns + r.dur_ns)
    out = {}
    for key, line in spans.items():
        s = sorted((a, b, run) for run, (a, b) in line.items())
        out[key] = [a for a, _, _ in s], [(b, run) for _, b, run in s]
    return out


def _run_at(runs, key: tuple, t: float) -> int | None:
    starts, ends = runs.get(key, ([], []))
    i = bisect.bisect_right(starts, t) - 1
    # executions on one thread follow each other: the last one begun before t holds t if it has not ended
    return ends[i][1] if i >= 0 and t < ends[i][0] else None


def host_launches(raw: Iterable) -> HostLaunches:
    """Index the host launch calls of `raw` (RawEvents of every plane)."""
    host = [r for r in raw if r.plane.startswith("/host:")]
    runs = _runs(host)
    by_corr, by_run = {}, {}
    for r in host:
        corr = r.stats.get("correlation_id")
        if corr in (None, ""):
            continue
        run = _run_at(runs, (r.plane, r.line), r.start_ns)
        by_corr[(r.stats.get("context_id"), corr)] = Launch(r.start_ns, run)
        if run is not None:
            by_run.setdefault((run, r.stats.get("device_id")), set()).add(corr)
    return HostLaunches(by_corr, by_run)
