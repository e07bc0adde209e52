"""Executions of a compiled program in a GPU trace: the kernels one call of the program ran.

Each kernel carries the PjRt ``run_id`` of the execution that launched it (`launches`), so one
(program_id, run_id) group is one execution of the program: one engine step for the step program,
wherever the host's step annotations fall and however many command buffers (CUDA graphs) and single
thunks XLA split it into (a prefill step: 8 graph launches with cub sorts and a conditional between
them). With the overlap schedule a step's kernels run mostly after its annotation closes (the host
has moved on to plan the next), so per-window busy time drops the kernels that run between windows;
per execution nothing is dropped. Traces without host launch events fall back to one group per
graph launch (program_id, correlation_id), right only where the program is a single command buffer.
"""

from __future__ import annotations

import collections
import re
import statistics
from typing import Iterable, Mapping

from atom_jax.trace import intervals as iv

MS = 1e6
_ORDINAL_RE = re.compile(r":(\d+)$")


def _groups(events: list) -> dict[tuple, list]:
    runs = collections.defaultdict(list)
    if any(e.run_id is not None and "program_id" in e.stats for e in events):
        for e in events:
            if e.run_id is not None and "program_id" in e.stats:
                runs[(e.stats["program_id"], e.run_id)].append(e)
        return runs
    for e in events:
        s = e.stats
        if "cuda_graph_id" in s and "correlation_id" in s and "program_id" in s:
            runs[(s["program_id"], s["correlation_id"])].append(e)
    return runs


def _complete(run: list, launched: Mapping[tuple, set]) -> bool | None:
    """Whether every launch the host made in this execution (for this device) ran in the capture;
    None where the host's launches are not known."""
    m = _ORDINAL_RE.search(run[0].device)
    ordinal = int(m.group(1)) if m else None
    want = launched.get((run[0].run_id, ordinal), launched.get((run[0].run_id, None)))
    if run[0].run_id is None or want is None:
        return None
    return want <= {e.stats.get("correlation_id") for e in run}


def executions(events: Iterable, launched: Mapping[tuple, set] | None = None) -> dict | None:
    """Summary of the executions of the program with the most kernel time (the step program in an
    engine trace), or None when no kernel says which execution launched it. Only complete executions
    count: those whose every host launch ran in the capture (`launched`: (run_id, device ordinal) ->
    correlation ids, `launches.HostLaunches.by_run`), else those with the most common kernel count
    (a capture can cut the last one)."""
    runs = _groups(list(events))
    if not runs:
        return None
    by_program = collections.defaultdict(list)
    for (program, _), evs in runs.items():
        by_program[program].append(evs)
    program, launches = max(by_program.items(), key=lambda kv: sum(e.dur_ns for r in kv[1] for e in r))
    complete = [_complete(r, launched or {}) for r in launches]
    if all(c is not None for c in complete):
        whole = [r for r, c in zip(launches, complete) if c]
    else:
        most = collections.Counter(len(r) for r in launches).most_common(1)[0][0]
        whole = [r for r in launches if len(r) == most]
    if not whole:
        return None
    whole.sort(key=lambda r: min(e.start_ns for e in r))
    first = [min(e.start_ns for e in r) for r in whole]  # each execution's first kernel start, last kernel end
    last = [max(e.start_ns + e.dur_ns for e in r) for r in whole]
    busy = [iv.total([(e.start_ns, e.start_ns + e.dur_ns) for e in r]) for r in whole]
    span = [b - a for a, b in zip(first, last)]
    counts = {len(r) for r in whole}
    return {
        "program_id": program,
        "hlo_module": whole[0][0].stats.get("hlo_module"),
        "executions": len(whole),
        "partial": len(launches) - len(whole),
        "kernels": counts.pop() if len(counts) == 1 else round(statistics.fmean(len(r) for r in whole), 1),
        "busy_ms": round(statistics.fmean(busy) / MS, 6),
        "span_ms": round(statistics.fmean(span) / MS, 6),
        "busy_share_of_span": round(sum(busy) / sum(span), 4) if sum(span) else None,
        # each execution in the order they ran (a chunked prefill's chunks: which cost more), and the
        # idle from the previous one's last kernel to this one's first (None for the first)
        "each": [{"busy_ms": round(b / MS, 3), "span_ms": round(s / MS, 3),
                  "gap_ms": None if i == 0 else round((first[i] - last[i - 1]) / MS, 3)}
                 for i, (b, s) in enumerate(zip(busy, span))],
    }
