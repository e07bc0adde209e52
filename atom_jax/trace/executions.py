"""Executions of a compiled program in a GPU trace: the kernels one call of the program ran.

Kernels XLA launches inside a command buffer (a CUDA graph) carry the graph launch's correlation
id, so one (program_id, correlation_id) group is one execution of the program: one engine step for
the step program, wherever the host's step annotations fall. With the overlap schedule a step's
kernels run mostly after its annotation closes (the host has moved on to plan the next), so the
per-window busy time drops the kernels that run between windows; per execution nothing is dropped.
"""

from __future__ import annotations

import collections
import statistics
from typing import Iterable

from atom_jax.trace import intervals as iv

MS = 1e6


def executions(events: Iterable) -> dict | None:
    """Summary of the executions of the program with the most graph-launched kernel time (the step
    program in an engine trace), or None when no kernel came from a graph launch. Only complete
    executions count: those with the most common kernel count (a capture can cut the last one)."""
    runs = collections.defaultdict(list)
    for e in events:
        s = e.stats
        if "cuda_graph_id" in s and "correlation_id" in s and "program_id" in s:
            runs[(s["program_id"], s["correlation_id"])].append(e)
    if not runs:
        return None
    by_program = collections.defaultdict(list)
    for (program, _), evs in runs.items():
        by_program[program].append(evs)
    program, launches = max(by_program.items(), key=lambda kv: sum(e.dur_ns for r in kv[1] for e in r))
    kernels = collections.Counter(len(r) for r in launches).most_common(1)[0][0]
    whole = [r for r in launches if len(r) == kernels]
    busy = [iv.total([(e.start_ns, e.start_ns + e.dur_ns) for e in r]) for r in whole]
    span = [max(e.start_ns + e.dur_ns for e in r) - min(e.start_ns for e in r) for r in whole]
    return {
        "program_id": program,
        "hlo_module": whole[0][0].stats.get("hlo_module"),
        "executions": len(whole),
        "partial": len(launches) - len(whole),
        "kernels": kernels,
        "busy_ms": round(statistics.fmean(busy) / MS, 6),
        "span_ms": round(statistics.fmean(span) / MS, 6),
        "busy_share_of_span": round(sum(busy) / sum(span), 4) if sum(span) else None,
    }
