"""Per-device summary of a profiler trace: step time, kernel time by category,
communication overlapped vs exposed, micro-batch (mb_a / mb_b) attribution, top kernels.

``python -m atom_jax.trace report DIR [--json OUT] [--top N] [--steps N]``

All times in the report are milliseconds *per step* (mean over the captured
steps) except ``top_kernels[].total_ms``, which sums the whole capture.
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path
from typing import Iterable

from atom_jax.trace import intervals as iv
from atom_jax.trace.categories import (
    CATEGORIES, COLLECTIVE, COMPUTE_CATEGORIES, MICRO_BATCHES, MIXED_MB, NO_LAYER, UNKNOWN_MB, layers_label,
)
from atom_jax.trace.events import Event, Trace, load_trace
from atom_jax.trace.executions import executions

MS = 1e6  # ns per ms
MB_ORDER = (*MICRO_BATCHES, MIXED_MB, UNKNOWN_MB)


def _spans(events: Iterable[Event]) -> list[iv.Interval]:
    return [(e.start_ns, e.end_ns) for e in events]


def step_windows(trace: Trace, device_events: list[Event]) -> list[tuple[float, float]]:
    """Annotated step windows, else the span of the device's events as one window."""
    if trace.steps:
        return [(s.start_ns, s.end_ns) for s in trace.steps]
    if not device_events:
        return []
    return [(min(e.start_ns for e in device_events), max(e.end_ns for e in device_events))]


def infer_step_count(events: list[Event]) -> int:
    """Executions in an unannotated capture: distinct ``run_id`` stats (CPU runtime sets one
    per execution), else 1."""
    run_ids = {e.stats.get("run_id") for e in events}
    run_ids.discard(None)
    return max(1, len(run_ids))


def launched_at(e: Event) -> float:
    """When `e` was launched (the host call's time where the trace has it), else when it started."""
    return e.launch_ns if e.launch_ns is not None else e.start_ns


def in_windows(events: list[Event], windows: list[tuple[float, float]]) -> list[Event]:
    """Events launched inside some window: a kernel belongs to the step that launched it, wherever
    it ran (the host does not wait for the device: an H200 prefill step's kernels ran on for 23 ms
    past its 27 ms annotation)."""
    return [e for e in events if any(s <= launched_at(e) < t for s, t in windows)]


def communication_split(events: list[Event], compute: list[iv.Interval]) -> dict:
    comm = _spans(e for e in events if e.category == COLLECTIVE)
    overlapped, exposed = iv.split_communication(comm, compute)
    total = overlapped + exposed
    return {"total_ns": total, "overlapped_ns": overlapped, "exposed_ns": exposed}


def _ms(ns: float, steps: int) -> float:
    return round(ns / MS / steps, 6)


def _pct(part: float, whole: float) -> float | None:
    return round(100.0 * part / whole, 2) if whole > 0 else None


def _comm_dict(split: dict, steps: int) -> dict:
    return {
        "total_ms": _ms(split["total_ns"], steps),
        "overlapped_ms": _ms(split["overlapped_ns"], steps),
        "exposed_ms": _ms(split["exposed_ns"], steps),
        "overlapped_pct": _pct(split["overlapped_ns"], split["total_ns"]),
        "exposed_pct": _pct(split["exposed_ns"], split["total_ns"]),
    }


def _top_kernels(events: list[Event], top: int, steps: int) -> list[dict]:
    groups: dict[str, list[Event]] = collections.defaultdict(list)
    for e in events:
        groups[e.name].append(e)
    rows = []
    for name, evs in groups.items():
        dur = sum(e.dur_ns for e in evs)
        mbs = sorted({e.micro_batch for e in evs}, key=MB_ORDER.index)
        rows.append({
            "name": name,
            "category": collections.Counter(e.category for e in evs).most_common(1)[0][0],
            "micro_batch": "+".join(mbs),
            "count": len(evs),
            "total_ms": round(dur / MS, 6),
            "per_step_ms": _ms(dur, steps),
            "mean_us": round(dur / len(evs) / 1e3, 3),
            # the instructions it ran (a command buffer's kernels carry the buffer's hlo_op stat)
            "hlo_ops": sorted({e.hlo.name if e.hlo is not None else e.hlo_op for e in evs} - {""})[:3],
            # every layer it ran in (one kernel serves all layers alike; "?": no op found to say)
            "layers": sorted({e.placed_layer for e in evs}),
        })
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:top]


SHORT_US = 10.0  # launches shorter than this are latency-bound: what a step bound by launches is made of


def _launches(events: list[Event], steps: int) -> dict:
    """Device events (kernels and copies) per step: all, the short ones (< SHORT_US) and their
    time, and per decoder layer scope (the `layer<i>` named scope in their op_name): mean, min
    and max over the layers seen, and outside every layer."""
    steps = max(steps, 1)
    short = [e for e in events if e.dur_ns < SHORT_US * 1e3]
    by_layer: dict[str, int] = {}
    for e in events:
        by_layer[e.layer] = by_layer.get(e.layer, 0) + 1
    outside = by_layer.pop(NO_LAYER, 0)
    per_layer = [c / steps for c in by_layer.values()]
    return {
        "per_step": round(len(events) / steps, 2),
        "short_per_step": round(len(short) / steps, 2),
        "short_ms_per_step": _ms(sum(e.dur_ns for e in short), steps),
        "layers": len(by_layer),
        "per_layer_mean": round(statistics.fmean(per_layer), 2) if per_layer else None,
        "per_layer_min": round(min(per_layer), 2) if per_layer else None,
        "per_layer_max": round(max(per_layer), 2) if per_layer else None,
        "outside_layers_per_step": round(outside / steps, 2),
        "by_layer": {k: round(v / steps, 2) for k, v in sorted(by_layer.items(), key=lambda kv: int(kv[0][5:]))},
    }


def analyse_device(trace: Trace, device: str, *, top: int = 10, steps: int | None = None) -> dict:
    all_events = [e for e in trace.events if e.device == device]
    windows = step_windows(trace, all_events)
    events = in_windows(all_events, windows) if trace.steps else all_events
    if trace.steps:
        n = len(windows)
        step_ms = statistics.fmean(t - s for s, t in windows) / MS
        step_source = "annotation"
    else:
        n = steps or infer_step_count(events)
        step_ms = (windows[0][1] - windows[0][0]) / MS / n if windows else 0.0
        step_source = "event span / steps"
    spans_per_step, past_end = [], []
    for s, t in windows:
        inside = [e for e in events if s <= launched_at(e) < t]
        if inside:
            spans_per_step.append(max(e.end_ns for e in inside) - min(e.start_ns for e in inside))
            past_end.append(max(0.0, max(e.end_ns for e in inside) - t))

    # With the overlap schedule a step's annotation (host side) need not cover the gap before the
    # next step: the period from one step's start to the next is the wall-clock step, and the
    # device's busy time inside [first start, last start) over it is the share that counts.
    starts = sorted(s for s, _ in windows) if trace.steps else []
    period_ms = busy_period = None
    if len(starts) >= 2:
        span = starts[-1] - starts[0]
        period_ms = round(span / (len(starts) - 1) / MS, 6)
        busy_period = round(iv.total(iv.clip(_spans(all_events), starts[0], starts[-1])) / span, 4) if span else None

    by_cat = {c: [e for e in events if e.category == c] for c in CATEGORIES}
    compute = _spans(e for e in events if e.category in COMPUTE_CATEGORIES)
    categories = {
        c: {"union_ms": _ms(iv.total(_spans(evs)), n), "sum_ms": _ms(sum(e.dur_ns for e in evs), n),
            "count": len(evs)}
        for c, evs in by_cat.items() if evs
    }

    micro = {}
    for mb in MB_ORDER:
        evs = [e for e in events if e.micro_batch == mb]
        if not evs:
            continue
        micro[mb] = {
            "busy_ms": _ms(iv.total(_spans(evs)), n),
            "sum_ms": _ms(sum(e.dur_ns for e in evs), n),
            "by_category_ms": {c: _ms(sum(e.dur_ns for e in evs if e.category == c), n)
                               for c in CATEGORIES if any(e.category == c for e in evs)},
            # Hidden = overlapped with compute of either micro-batch (that is the TBO goal).
            "communication": _comm_dict(communication_split(evs, compute), n),
        }

    return {
        "events": len(events),
        "launches": _launches(events, n),
        "steps": n,
        "step_source": step_source,
        "step_time_ms": round(step_ms, 6),
        "device_span_ms": round(statistics.fmean(spans_per_step) / MS, 6) if spans_per_step else 0.0,
        # how long a step's kernels run on after its window closes (the host did not wait for them)
        "device_after_step_ms": round(statistics.fmean(past_end) / MS, 6) if past_end else 0.0,
        "busy_ms": _ms(iv.total(_spans(events)), n),
        "step_period_ms": period_ms,  # start to start of consecutive annotated steps (None: < 2)
        "busy_share_of_period": busy_period,
        # per execution of the step program (None where kernels do not say which one launched them)
        "executions": executions(all_events, trace.runs),
        "categories": categories,
        "communication": _comm_dict(communication_split(events, compute), n),
        "micro_batches": micro,
        "top_kernels": _top_kernels(events, top, n),
        # share of the kernels' time whose HLO op is known (op_name, layer, micro-batch come from it);
        # a low share means the trace lacks the module or the kernels' annotations
        "hlo_known_share": round(sum(e.dur_ns for e in events if e.hlo is not None)
                                 / max(sum(e.dur_ns for e in events), 1e-9), 4) if events else None,
    }


def analyse(trace: Trace, *, top: int = 10, steps: int | None = None) -> dict:
    return {
        "trace": str(trace.path),
        "source": trace.source,
        "platform": trace.platform,
        "units": "ms per step (top_kernels.total_ms: whole capture)",
        "annotated_steps": [{"num": s.num, "ms": round(s.dur_ns / MS, 6),
                             "compile_ms": round(s.compile_ns / MS, 6)} for s in trace.steps],
        # steps that include XLA compilation: their times are not run times
        "compiled_steps": [s.num for s in trace.steps if s.compile_ns > 0],
        "hlo_modules": trace.hlo.module_names,
        "devices": {d: analyse_device(trace, d, top=top, steps=steps) for d in trace.devices},
    }


def report(path: str | Path, *, top: int = 10, steps: int | None = None) -> dict:
    """Load the newest trace under ``path`` and summarise it (see module docstring)."""
    return analyse(load_trace(path), top=top, steps=steps)


# --- text table ---------------------------------------------------------------------------

def _f(x: float | None, width: int = 9, digits: int = 3) -> str:
    return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def _pct_text(p: float | None) -> str:
    return f"{p:.1f}%" if p is not None else "-"


def _launch_line(la: dict | None) -> str:
    if not la:
        return "   launches: -"
    line = (f"   launches {la['per_step']:.1f} per step, {la['short_per_step']:.1f} under {SHORT_US:g} us "
            f"({la['short_ms_per_step']:.3f} ms)")
    if la["layers"]:
        line += (f"; per layer {la['per_layer_mean']:.1f} (min {la['per_layer_min']:.1f}, max "
                 f"{la['per_layer_max']:.1f}) over {la['layers']} layers, {la['outside_layers_per_step']:.1f} outside")
    return line


def _executions_line(x: dict) -> str:
    return (f"   per execution of {x['hlo_module']} ({x['executions']} whole, {x['partial']} cut;"
            f" {x['kernels']} kernels each): busy {x['busy_ms']:.3f} ms of a {x['span_ms']:.3f} ms span"
            + (f" ({_pct_text(100 * x['busy_share_of_span'])})" if x["busy_share_of_span"] is not None else ""))


def _device_lines(device: str, d: dict) -> list[str]:
    out = [f"== {device}: {d['events']} events over {d['steps']} step(s) ({d['step_source']})",
           f"   step {d['step_time_ms']:.3f} ms | device span {d['device_span_ms']:.3f} ms"
           f" | busy {d['busy_ms']:.3f} ms  (per step)"
           + (f"\n   a step's kernels run on {d['device_after_step_ms']:.3f} ms past its window (launched in it,"
              " counted in it)" if d.get("device_after_step_ms", 0) > 0.01 * d["step_time_ms"] else "")
           + (f"\n   period {d['step_period_ms']:.3f} ms (step start to next step start), device busy "
              f"{_pct_text(100 * d['busy_share_of_period'])} of it" if d.get("busy_share_of_period") is not None else ""),
           *([_executions_line(d["executions"])] if d.get("executions") else []),
           _launch_line(d.get("launches")),
           *([f"   HLO op known for {_pct_text(100 * d['hlo_known_share'])} of the kernels' time"]
             if d.get("hlo_known_share") is not None else []),
           f"   {'category':<12}{'union ms':>10}{'sum ms':>10}{'count':>8}{'% busy':>8}"]
    for c, v in d["categories"].items():
        pct = _pct(v["union_ms"], d["busy_ms"])  # of the busy time: a step's kernels may outlast its window
        out.append(f"   {c:<12}{_f(v['union_ms'], 10)}{_f(v['sum_ms'], 10)}{v['count']:>8}"
                   f"{_f(pct, 8, 1)}")
    cm = d["communication"]
    out.append(f"   communication {cm['total_ms']:.3f} ms:"
               f" overlapped {cm['overlapped_ms']:.3f} ms ({_pct_text(cm['overlapped_pct'])}),"
               f" exposed {cm['exposed_ms']:.3f} ms ({_pct_text(cm['exposed_pct'])})")
    mbs = d["micro_batches"]
    if mbs:
        cats = [c for c in CATEGORIES if any(c in m["by_category_ms"] for m in mbs.values())]
        out.append(f"   {'micro-batch':<12}{'busy ms':>10}" + "".join(f"{c:>11}" for c in cats)
                   + f"{'comm exp':>10}")
        for mb, m in mbs.items():
            out.append(f"   {mb:<12}{_f(m['busy_ms'], 10)}"
                       + "".join(_f(m["by_category_ms"].get(c), 11) for c in cats)
                       + _f(m["communication"]["exposed_ms"], 10))
    if d["top_kernels"]:
        out.append(f"   top kernels: {'total ms':>10}{'count':>7}{'mean us':>10}  "
                   f"{'category':<11}{'mb':<12}{'layer':<12}name")
        for k in d["top_kernels"]:
            name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
            layer = layers_label(k.get("layers", []))
            out.append(f"   {'':<13}{_f(k['total_ms'], 10)}{k['count']:>7}"
                       f"{_f(k['mean_us'], 10, 1)}  {k['category']:<11}{k['micro_batch']:<12}{layer:<12}{name}")
    return out


def format_report(rep: dict) -> str:
    """The report as a plain-text table, one block per device."""
    out = [f"trace: {rep['trace']}  ({rep['source']}, {rep['platform']})"]
    if rep["annotated_steps"]:
        ms = ", ".join(f"{s['ms']:.3f}" for s in rep["annotated_steps"])
        out.append(f"annotated steps ({len(rep['annotated_steps'])}): {ms} ms")
    if rep.get("compiled_steps"):
        compiled = [s for s in rep["annotated_steps"] if s["num"] in rep["compiled_steps"]]
        what = ", ".join(f"step {s['num']} ({s['compile_ms'] / 1e3:.1f} s)" for s in compiled)
        out.append(f"WARNING: {what} include XLA compilation, so their times (and the "
                   "per-step means below) are not run times: warm the engine up before tracing")
    if not rep["devices"]:
        out.append("no device events found")
    for device, d in rep["devices"].items():
        out += ["", *_device_lines(device, d)]
    return "\n".join(out)
