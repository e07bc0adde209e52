"""Load a ``jax.profiler`` trace directory into flat per-device events.

Layout written by ``jax.profiler.start_trace(DIR)`` / ``stop_trace()``::

    DIR/plugins/profile/<YYYY_MM_DD_hh_mm_ss>/<host>.xplane.pb       (always)
    DIR/plugins/profile/<YYYY_MM_DD_hh_mm_ss>/<host>.trace.json.gz   (jax also writes this)

The xplane is preferred: it carries the compiled HLO modules (see
:mod:`.hlo_index`), which name the ops fused into each kernel and their
``jax.named_scope`` path. The Chrome JSON has only names and string stats.

Where device work lives:
  * GPU: planes ``/device:GPU:N``; kernels and memcpys on lines ``Stream #K(...)``,
    each with stats ``hlo_op``, ``hlo_module``, ``program_id``, except the kernels XLA
    launched inside a command buffer (a CUDA graph): those carry the command buffer's
    ``hlo_op`` (``command_buffer_1``) or none, and are matched to their HLO instruction by
    their place in the graph launch and their name (``HloIndex.lookup_launch``). Each also
    carries the correlation id of the host call that launched it (:mod:`.launches`): when, and
    in which program execution.
  * CPU backend: no device planes. Each executed HLO op (thunk) is an event on a
    host thread line of ``/host:CPU`` (``tf_XLAPjRtCpuClient/...``) with stats
    ``hlo_op``, ``hlo_module``, ``device_ordinal``; those become per-device events
    for ``/device:CPU:<device_ordinal>``.
  * Step markers: ``jax.profiler.StepTraceAnnotation`` events (stat ``step_num``)
    on the host ``python`` line.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from atom_jax.trace import intervals as iv
from atom_jax.trace.categories import (
    NO_LAYER, UNKNOWN_LAYER, classify, layer_of, micro_batch as micro_batch_of,
)
from atom_jax.trace.hlo_index import HloIndex, HloOpInfo, hlo_index_from_xspace
from atom_jax.trace.launches import HostLaunches, host_launches

XPLANE_GLOB = "*.xplane.pb"
CHROME_GLOB = "*.trace.json.gz"
HOST_CPU_PLANE = "/host:CPU"
# Lines the xprof converters derive from the kernels; counting them would double count.
DERIVED_LINES = frozenset({
    "XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope",
    "Framework Ops", "TensorFlow Name Scope", "TensorFlow Ops", "Source code", "Launch Stats",
})
_DEVICE_PLANE_RE = re.compile(r"^/device:([A-Z_]+):(\d+)")


@dataclasses.dataclass(frozen=True)
class Event:
    device: str  # "/device:GPU:0", "/device:CPU:1"
    lane: str  # line (stream or thread) it was recorded on
    name: str  # kernel name (GPU) or HLO op name (CPU thunk)
    start_ns: float
    dur_ns: float
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hlo: HloOpInfo | None = None  # the HLO instruction it ran, when the trace has the module
    launch_ns: float | None = None  # when the host launched it (GPU: its correlation id's host call)
    run_id: int | None = None  # the program execution that launched it (PjRt run_id), where known

    @property
    def end_ns(self) -> float:
        return self.start_ns + self.dur_ns

    @property
    def hlo_op(self) -> str:
        return str(self.stats.get("hlo_op", "") or "")

    @functools.cached_property  # regex work; events are immutable
    def category(self) -> str:
        h = self.hlo
        if h is None:
            return classify([self.name, self.hlo_op])
        return classify([self.name, h.custom_call_target, self.hlo_op], h.opcode, h.fused_opcodes)

    @functools.cached_property
    def micro_batch(self) -> str:
        texts = [self.name, self.hlo_op]
        texts += [str(v) for k, v in self.stats.items() if k in _SCOPE_STATS]
        if self.hlo is not None:
            texts += [self.hlo.op_name, *self.hlo.fused_op_names]
        return micro_batch_of(texts)

    @functools.cached_property
    def layer(self) -> str:
        """The decoder layer scope ("layer<i>") of the op it ran: its own op_name's, else
        categories.NO_LAYER; the ops fused into it only where it has no op_name of its own (a
        fusion also holds ops XLA shares between scopes: a decode step's layer-2 position arithmetic
        is fused into other layers' kernels and into the sampling after the last layer)."""
        texts = [str(v) for k, v in self.stats.items() if k in _SCOPE_STATS]
        if self.hlo is not None:
            texts = [self.hlo.op_name] + texts + ([] if self.hlo.op_name else list(self.hlo.fused_op_names))
        return layer_of(texts)

    @property
    def placed_layer(self) -> str:
        """`layer` where its HLO op or a scope stat says it, else categories.UNKNOWN_LAYER (its
        NO_LAYER would claim that an op no one identified ran outside every layer)."""
        layer = self.layer
        scoped = any("/" in str(v) for k, v in self.stats.items() if k in _SCOPE_STATS)  # an op_name path
        return UNKNOWN_LAYER if layer == NO_LAYER and self.hlo is None and not scoped else layer


# Stats that may hold the op_name path; GPU kernels carry it as "name"
# ("jit(step)/shard_map/mb_b/dot_general"), also in the Chrome JSON. Scanned for mb_a / mb_b.
_SCOPE_STATS = frozenset({"name", "tf_op", "long_name", "name_scope"})


@dataclasses.dataclass(frozen=True)
class Step:
    num: int
    start_ns: float
    dur_ns: float
    compile_ns: float = 0.0  # XLA compilation on the host inside this step (0: none)

    @property
    def end_ns(self) -> float:
        return self.start_ns + self.dur_ns


@dataclasses.dataclass
class Trace:
    path: Path
    source: str  # "xplane" | "chrome"
    platform: str  # "gpu" | "cpu" | "tpu" | ...
    events: list[Event]
    steps: list[Step]
    hlo: HloIndex
    lanes: dict[str, list[str]]  # plane name -> its line names, for diagnostics
    # (run_id, device_id) -> correlation ids the host launched in that program execution
    runs: Mapping[tuple, set] = dataclasses.field(default_factory=dict)

    @property
    def devices(self) -> list[str]:
        return sorted({e.device for e in self.events}, key=_device_sort_key)


@dataclasses.dataclass(frozen=True)
class RawEvent:
    """One event as recorded, before deciding which device it belongs to."""
    plane: str
    line: str
    name: str
    start_ns: float
    dur_ns: float
    stats: dict


# jax's host-side marker around an XLA compile ("backend_compile_and_load" in current jax,
# "backend_compile" before), else the PjRt client's own
COMPILE_EVENT_RE = re.compile(r"^(backend_compile|PjRt\w*Client::Compile$)")


def _device_sort_key(name: str):
    m = _DEVICE_PLANE_RE.match(name)
    return (0, m.group(1), int(m.group(2))) if m else (1, name, 0)


# --- finding the file -------------------------------------------------------------------

def find_trace_file(path: str | Path) -> Path:
    """The newest ``*.xplane.pb`` (else ``*.trace.json.gz``) for a log dir, run dir or file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such trace directory: {path}")
    for pattern in (XPLANE_GLOB, CHROME_GLOB):
        found = [p for root in (path / "plugins" / "profile", path)
                 for p in root.glob(f"*/{pattern}")] + list(path.glob(pattern))
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime, str(p)))
    raise FileNotFoundError(f"no {XPLANE_GLOB} or {CHROME_GLOB} under {path}/plugins/profile/*/")


# --- reading --------------------------------------------------------------------------------

def read_xplane(data: bytes) -> tuple[list[RawEvent], dict[str, list[str]]]:
    from jax.profiler import ProfileData  # the heavy import only when a trace is read

    profile = ProfileData.from_serialized_xspace(data)
    raw, lanes = [], {}
    for plane in profile.planes:
        lanes[plane.name] = []
        for line in plane.lines:
            lanes[plane.name].append(line.name)
            for ev in line.events:
                raw.append(RawEvent(plane.name, line.name, ev.name, float(ev.start_ns),
                                    float(ev.duration_ns), dict(ev.stats)))
    return raw, lanes


def _maybe_number(v):
    """Chrome JSON args are strings; numeric ones (step_num, device_ordinal) become ints."""
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v):
        return int(v)
    return v


def read_chrome_trace(data: bytes) -> tuple[list[RawEvent], dict[str, list[str]]]:
    doc = json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    processes: dict[Any, str] = {}
    threads: dict[tuple, str] = {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            processes[ev["pid"]] = ev["args"]["name"]
        elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
            threads[(ev["pid"], ev.get("tid"))] = ev["args"]["name"]
    raw, lanes = [], {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        plane = processes.get(ev.get("pid"), str(ev.get("pid")))
        line = threads.get((ev.get("pid"), ev.get("tid")), str(ev.get("tid")))
        lanes.setdefault(plane, [])
        if line not in lanes[plane]:
            lanes[plane].append(line)
        stats = {k: _maybe_number(v) for k, v in (ev.get("args") or {}).items()}
        raw.append(RawEvent(plane, line, ev.get("name", ""), float(ev["ts"]) * 1e3,
                            float(ev.get("dur", 0.0)) * 1e3, stats))
    return raw, lanes


# --- normalising ----------------------------------------------------------------------------

def _kernel_lines(line_names: Iterable[str]) -> set[str]:
    """Lines of a device plane that hold the kernels themselves."""
    names = set(line_names)
    streams = {n for n in names if n.startswith("Stream")}
    if streams:
        return streams
    if "XLA Ops" in names:  # TPU: ops are the finest device events there
        return {"XLA Ops"}
    return names - DERIVED_LINES


def _graph_launches(picked: list[tuple[str, RawEvent]], infos: list[HloOpInfo | None]):
    """The kernels to match by name and place, one group per graph launch: events whose hlo_op
    names no instruction, for want of one or because they ran as CUDA-graph nodes (stat
    ``cuda_graph_id``), whose hlo_op is the command buffer's thunk (``command_buffer_1``). A launch's
    kernels share a correlation id; they are ordered by start time, the order the graph ran them in
    (not by graph node id: a cuBLAS call's kernels are nodes of a child graph, numbered after all of
    the command buffer's own nodes). Yields (indexes into `picked`, kernel names, program id, module)."""
    groups: dict[tuple, list[int]] = {}
    for i, ((device, r), info) in enumerate(zip(picked, infos)):
        if info is not None or (r.stats.get("hlo_op") and "cuda_graph_id" not in r.stats):
            continue  # found, or an annotated kernel whose op is unknown: not guessed from its name
        corr = r.stats.get("correlation_id")
        key = (device, r.stats.get("program_id"), r.stats.get("hlo_module"), r.stats.get("context_id"),
               corr if corr not in (None, "") else ("event", i))
        groups.setdefault(key, []).append(i)
    for (_, program, module, _, _), idx in groups.items():
        idx.sort(key=lambda i: (picked[i][1].start_ns, picked[i][1].stats.get("cuda_graph_node_id", 0)))
        yield idx, [picked[i][1].name for i in idx], program, module


def normalise(raw: list[RawEvent], lanes: Mapping[str, list[str]], hlo: HloIndex | None = None,
              launches: HostLaunches | None = None) -> tuple[list[Event], list[Step], str]:
    """Device events, step markers and platform from raw recorded events."""
    hlo = hlo or HloIndex()
    launches = launches or host_launches(raw)
    device_planes = {p for p in lanes if _DEVICE_PLANE_RE.match(p)}
    kernel_lines = {p: _kernel_lines(lanes[p]) for p in device_planes}
    picked = [(r.plane, r) for r in raw
              if r.dur_ns > 0 and r.plane in device_planes and r.line in kernel_lines[r.plane]]
    if not picked:
        # CPU backend: the executed HLO ops are host-thread events tagged with hlo_op.
        for r in raw:
            if r.dur_ns > 0 and r.plane.startswith("/host:") and r.stats.get("hlo_op"):
                ordinal = r.stats.get("device_ordinal")
                picked.append((f"/device:CPU:{ordinal}" if ordinal not in (None, "") else r.plane, r))
    infos = [hlo.lookup(r.stats.get("program_id"), r.stats.get("hlo_module"), r.stats.get("hlo_op"))
             for _, r in picked]
    for idx, names, program, module in _graph_launches(picked, infos):
        for i, info in zip(idx, hlo.lookup_launch(names, program, module)):
            infos[i] = info
    events = []
    for (device, r), info in zip(picked, infos):
        launch = launches.of(r.stats)
        events.append(Event(device, r.line, r.name, r.start_ns, r.dur_ns, r.stats, info,
                            *((launch.host_ns, launch.run_id) if launch else ())))
    events.sort(key=lambda e: (e.device, e.start_ns))

    steps: dict[int, Step] = {}
    for r in raw:
        if r.plane.startswith("/host:") and "step_num" in r.stats and r.dur_ns > 0:
            num = int(r.stats["step_num"])
            steps.setdefault(num, Step(num, r.start_ns, r.dur_ns))
    compiles = [r for r in raw if r.plane.startswith("/host:") and COMPILE_EVENT_RE.match(r.name)]
    for num, st in steps.items():
        inside = [(r.start_ns, r.start_ns + r.dur_ns) for r in compiles
                  if st.start_ns <= r.start_ns < st.start_ns + st.dur_ns]
        if inside:
            steps[num] = dataclasses.replace(st, compile_ns=iv.total(inside))

    m = next((_DEVICE_PLANE_RE.match(p) for p in sorted(device_planes)), None)
    platform = m.group(1).lower() if m else "cpu"
    return events, sorted(steps.values(), key=lambda s: s.start_ns), platform


def load_trace(path: str | Path) -> Trace:
    """Read the newest trace under ``path`` (log dir, run dir, or a file)."""
    file = find_trace_file(path)
    data = file.read_bytes()
    if file.name.endswith(".xplane.pb"):
        raw, lanes = read_xplane(data)
        hlo, source = hlo_index_from_xspace(data), "xplane"
    else:
        raw, lanes = read_chrome_trace(data)
        hlo, source = HloIndex(), "chrome"
    launches = host_launches(raw)
    events, steps, platform = normalise(raw, lanes, hlo, launches)
    return Trace(file, source, platform, events, steps, hlo, lanes, launches.by_run)
