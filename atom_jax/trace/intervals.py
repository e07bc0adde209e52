"""Interval arithmetic over half-open time intervals ``(start, end)``.

A *union* here is a sorted list of disjoint, non-touching intervals: the normal
form every function returns. Inputs may be in any order and may overlap; empty
or inverted intervals (``end <= start``) are dropped. Pure Python, no jax.

Used to answer "how long was the device busy with X" without double counting
kernels that overlap (several CUDA streams, nested CPU thunks).
"""

from __future__ import annotations

from typing import Iterable

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Merge intervals into sorted disjoint ones; touching intervals are joined."""
    merged: list[list[float]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def total(intervals: Iterable[Interval]) -> float:
    """Covered length, overlaps counted once."""
    return sum(e - s for s, e in union(intervals))


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Union of the time covered by both ``a`` and ``b``."""
    ua, ub = union(a), union(b)
    out: list[Interval] = []
    i = j = 0
    while i < len(ua) and j < len(ub):
        start = max(ua[i][0], ub[j][0])
        end = min(ua[i][1], ub[j][1])
        if end > start:
            out.append((start, end))
        # Advance whichever interval finishes first; the other may still overlap more.
        if ua[i][1] <= ub[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Union of the time covered by ``a`` but not by ``b``."""
    ub = union(b)
    out: list[Interval] = []
    j = 0
    for start, end in union(a):
        cur = start
        while j < len(ub) and ub[j][1] <= cur:
            j += 1
        k = j  # b intervals may span several a intervals: don't consume them
        while k < len(ub) and ub[k][0] < end:
            if ub[k][0] > cur:
                out.append((cur, ub[k][0]))
            cur = max(cur, ub[k][1])
            if cur >= end:
                break
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def clip(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    """Union of ``intervals`` restricted to ``[start, end)``."""
    return intersect(intervals, [(start, end)])


def split_communication(comm: Iterable[Interval], compute: Iterable[Interval]) -> tuple[float, float]:
    """``(overlapped, exposed)`` communication time.

    Overlapped: collective time during which some compute kernel also ran (hidden).
    Exposed: collective time with no compute running (the device waits on the network).
    The two always add up to ``total(comm)``.
    """
    comm_u, compute_u = union(comm), union(compute)
    overlapped = total(intersect(comm_u, compute_u))
    exposed = total(subtract(comm_u, compute_u))
    return overlapped, exposed
