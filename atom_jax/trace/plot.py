"""Timeline of one step: per device a compute lane and a communication lane.

``python -m atom_jax.trace plot DIR -o timeline.png [--step N]``

Compute kernels are coloured by micro-batch (mb_a / mb_b / mixed / unknown);
collectives get their own colour family so exposed communication stands out
where the compute lane above it is empty. Needs matplotlib (Agg backend).
"""

from __future__ import annotations

from pathlib import Path

from atom_jax.trace import intervals as iv
from atom_jax.trace.categories import COLLECTIVE, MICRO_BATCHES, MIXED_MB, UNKNOWN_MB
from atom_jax.trace.events import Trace, load_trace
from atom_jax.trace.report import launched_at

COMPUTE_COLOURS = {MICRO_BATCHES[0]: "#1f77b4", MICRO_BATCHES[1]: "#ff7f0e",
                   MIXED_MB: "#9467bd", UNKNOWN_MB: "#9e9e9e"}
# Collectives: reds, a shade per micro-batch so their owner is still visible.
COMM_COLOURS = {MICRO_BATCHES[0]: "#d62728", MICRO_BATCHES[1]: "#8c1a1a",
                MIXED_MB: "#e377c2", UNKNOWN_MB: "#c94f4f"}
LANE_HEIGHT = 0.8


def select_window(trace: Trace, step: int | None) -> tuple[float, float, str]:
    """(start_ns, end_ns, label): annotated step ``step`` (default: the last one), else
    the whole capture."""
    if trace.steps:
        chosen = trace.steps[-1] if step is None else next(
            (s for s in trace.steps if s.num == step), None)
        if chosen is None:
            nums = [s.num for s in trace.steps]
            raise SystemExit(f"--step {step}: annotated steps are {nums}")
        return chosen.start_ns, chosen.end_ns, f"step {chosen.num}"
    if not trace.events:
        raise SystemExit(f"no device events in {trace.path}")
    return (min(e.start_ns for e in trace.events), max(e.end_ns for e in trace.events),
            "whole capture (no step annotations)")


def plot_timeline(path: str | Path, out: str | Path, *, step: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trace = load_trace(path)
    start, end, label = select_window(trace, step)
    devices = trace.devices
    fig_h = 1.0 + 1.1 * max(1, len(devices))
    fig, ax = plt.subplots(figsize=(14, fig_h))
    yticks, ylabels = [], []
    used: set[tuple[str, str]] = set()  # (lane kind, micro-batch) drawn, for the legend
    # a step's kernels are those it launched; they may run on past its window, and are drawn
    mine = [e for e in trace.events if start <= launched_at(e) < end]
    end = max([end] + [e.end_ns for e in mine])
    for i, device in enumerate(devices):
        events = [e for e in mine if e.device == device]
        compute_y, comm_y = 2 * i, 2 * i + 1  # y axis inverted below: compute above comm
        for kind, y, lane_events, colours in (
            ("compute", compute_y, [e for e in events if e.category != COLLECTIVE], COMPUTE_COLOURS),
            ("collective", comm_y, [e for e in events if e.category == COLLECTIVE], COMM_COLOURS),
        ):
            for mb, colour in colours.items():
                spans = iv.union((e.start_ns, e.end_ns) for e in lane_events if e.micro_batch == mb)
                bars = [((s - start) / 1e6, (t - s) / 1e6) for s, t in spans]
                if bars:
                    used.add((kind, mb))
                    ax.broken_barh(bars, (y - LANE_HEIGHT / 2, LANE_HEIGHT), facecolors=colour)
        yticks += [compute_y, comm_y]
        ylabels += [f"{device} compute", f"{device} comm"]
    ax.set_yticks(yticks, ylabels)
    ax.set_ylim(2 * max(1, len(devices)), -1)  # inverted: first device on top
    ax.set_xlim(0, (end - start) / 1e6)
    ax.set_xlabel(f"ms from start of {label}")
    ax.set_title(f"{trace.path.name}: {label}, {(end - start) / 1e6:.3f} ms")
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=colours[mb], label=f"{kind} {mb}")
              for kind, colours in (("compute", COMPUTE_COLOURS), ("collective", COMM_COLOURS))
              for mb in colours if (kind, mb) in used]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              frameon=False)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
