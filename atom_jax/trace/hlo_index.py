"""HLO modules embedded in an ``*.xplane.pb``, indexed by instruction name.

The profiler stores each compiled module's ``HloProto`` on the ``/host:metadata``
plane (one event-metadata entry per program, stats ``Hlo Proto`` and
``program_id``). Device events only carry ``hlo_op`` / ``hlo_module`` /
``program_id`` stats, so this index is how a kernel named ``loop_fusion_3`` or
``ynn_fusion.1`` is traced back to the ``dot`` it computes and to the
``jax.named_scope`` (``.../mb_a/...``) it was written under.

Kernels XLA launches inside a command buffer (a CUDA graph) carry the command buffer's
``hlo_op`` (``command_buffer_1``, a thunk with no instruction in the stored module) or none;
`HloIndex.lookup_launch` matches one graph launch's kernels, in the order they ran, to a stretch
of a computation's schedule (`parse_hlo_proto`'s launch orders; `launch_align`).

``jax.profiler.ProfileData`` does not expose plane metadata, and jaxlib ships no
generated protobuf classes, so this decodes the few fields needed straight from
the protobuf wire format. Field numbers are those of ``xplane.proto`` and
``xla/service/hlo.proto``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from atom_jax.trace.launch_align import KernelFit, align, bare_kernel_name, kernel_name_of

# xplane.proto
_XSPACE_PLANES = 1
_XPLANE_NAME, _XPLANE_EVENT_METADATA, _XPLANE_STAT_METADATA = 2, 4, 5
_MAP_KEY, _MAP_VALUE = 1, 2
_XEVENTMETA_NAME, _XEVENTMETA_STATS = 2, 5
_XSTATMETA_ID, _XSTATMETA_NAME = 1, 2
_XSTAT_METADATA_ID, _XSTAT_UINT64, _XSTAT_INT64, _XSTAT_STR, _XSTAT_BYTES = 1, 3, 4, 5, 6
# hlo.proto
_HLOPROTO_MODULE = 1
_MODULE_NAME, _MODULE_COMPUTATIONS, _MODULE_ENTRY_ID, _MODULE_SCHEDULE = 1, 3, 6, 7
_SCHEDULE_SEQUENCES, _SEQUENCE_IDS = 1, 1  # HloScheduleProto: map<computation id, {instruction ids}>
_COMP_INSTRUCTIONS, _COMP_ID = 2, 5
_INSTR_NAME, _INSTR_OPCODE, _INSTR_SHAPE, _INSTR_METADATA = 1, 2, 3, 7
_INSTR_CUSTOM_CALL_TARGET, _INSTR_ID, _INSTR_CALLED_COMPUTATIONS, _INSTR_BACKEND_CONFIG = 28, 35, 38, 43
_OPMETA_OP_NAME = 2

METADATA_PLANE = "/host:metadata"
# Opcodes whose called computations run inside the same kernel(s).
_INLINED_CALLERS = frozenset({"fusion", "async-start", "custom-call"})
# Opcodes whose called computations run as their own kernels (a while body, a conditional's branches).
_CONTROL_FLOW = frozenset({"while", "conditional", "call"})
# Entry-computation opcodes that launch nothing on the device (besides every "*-done").
_NO_LAUNCH = frozenset({"parameter", "get-tuple-element", "bitcast", "constant", "tuple", "after-all",
                        "add-dependency", "opt-barrier", "domain"})
# A Triton (Pallas) custom call's kernel name in its backend_config: `name = "grouped_gemm"`.
_BACKEND_KERNEL_RE = re.compile(r'\bname = "([^"\\]*)"')


@dataclasses.dataclass(frozen=True)
class HloOpInfo:
    name: str
    opcode: str
    op_name: str = ""  # OpMetadata.op_name, e.g. "jit(step)/mb_a/dot_general"
    custom_call_target: str = ""
    fused_opcodes: frozenset[str] = frozenset()
    fused_op_names: tuple[str, ...] = ()  # op_name of every op fused into this one
    backend_kernel: str = ""  # a Triton / Pallas custom call's kernel name (backend_config `name`)
    shape: bytes = b""  # its result's ShapeProto, serialized: identical fusions (one kernel) have one shape


def _by_kernel_name(ops: dict[str, HloOpInfo]) -> dict[str, list[HloOpInfo]]:
    out: dict[str, list[HloOpInfo]] = {}
    for name, info in ops.items():
        out.setdefault(kernel_name_of(name), []).append(info)
    return out


def _by_pallas_kernel(ops: dict[str, HloOpInfo]) -> dict[str, list[HloOpInfo]]:
    out: dict[str, list[HloOpInfo]] = {}
    for info in ops.values():
        if info.backend_kernel:
            out.setdefault(kernel_name_of(info.backend_kernel), []).append(info)
    return out


@dataclasses.dataclass
class _Module:
    ops: dict[str, HloOpInfo]  # kept so the id() key of the index stays theirs
    by_name: dict[str, list[HloOpInfo]]  # kernel name (`kernel_name_of`) -> ops
    by_pallas: dict[str, list[HloOpInfo]]  # Pallas kernel name -> its custom calls
    fit: KernelFit  # the schedules' launching instructions, for `launch_align.align`


class HloIndex:
    """``lookup(program_id, module, hlo_op)`` -> :class:`HloOpInfo` or None; for device events whose
    ``hlo_op`` names no instruction (kernels XLA launched inside a command buffer, a CUDA graph, carry
    the command buffer's thunk name or none), `lookup_launch` (one graph launch's kernels, by their
    place in the schedule) and `lookup_kernel` (one kernel, by its name)."""

    def __init__(self) -> None:
        self._by_program: dict[int, dict[str, HloOpInfo]] = {}
        self._by_module: dict[str, dict[str, HloOpInfo]] = {}
        self._modules: dict[int, _Module] = {}  # id(a module's ops) -> its indexes
        self._aligned: dict[tuple, list] = {}  # (id(ops), kernel names) -> places

    def add_module(self, module_name: str, program_id: int | None, ops: dict[str, HloOpInfo],
                   launch_orders=()) -> None:
        """`launch_orders`: the launching instructions of each scheduled computation, in schedule
        order (`parse_hlo_proto`), the entry computation's first."""
        if program_id is not None:
            self._by_program[program_id] = ops
        self._by_module.setdefault(module_name, ops)
        if id(ops) not in self._modules:
            by_name = _by_kernel_name(ops)
            orders = tuple(o for o in (tuple(n for n in order if n in ops) for order in launch_orders) if o)
            self._modules[id(ops)] = _Module(ops, by_name, _by_pallas_kernel(ops), KernelFit(ops, by_name, orders))

    def _ops(self, program_id, module) -> dict[str, HloOpInfo] | None:
        ops = None
        if program_id not in (None, ""):
            try:
                ops = self._by_program.get(int(program_id))
            except (TypeError, ValueError):
                ops = None
        if ops is None and module:
            ops = self._by_module.get(str(module))
        return ops

    def lookup(self, program_id, module, hlo_op) -> HloOpInfo | None:
        if not hlo_op:
            return None
        ops = self._ops(program_id, module)
        return ops.get(hlo_op) if ops else None

    @staticmethod
    def _named(mod: _Module, kernel: str) -> list[HloOpInfo]:
        """The module's ops a kernel is named after: the instruction's kernel name, else a Pallas
        kernel's (without the uniquer's ``__<n>``: XLA's second distinct kernel of one name)."""
        return mod.by_name.get(kernel) or mod.by_pallas.get(bare_kernel_name(kernel), [])

    def lookup_kernel(self, kernel: str, program_id=None, module=None) -> HloOpInfo | None:
        """The op whose kernel (`kernel_name_of`, or a Pallas call's kernel name) is named `kernel`: in
        the event's own program or module where it names one; else among all indexed modules (a trace
        holds every bucket's step program, whose instructions may share names), the op they agree on:
        every op of that kernel name with the same opcode and op_name, so layer and micro-batch do not
        depend on which program ran. None where a module holds two such ops or the candidates disagree."""
        ops = self._ops(program_id, module)
        if ops is not None:
            found = self._named(self._modules[id(ops)], kernel)
            return found[0] if len(found) == 1 else None
        found = []
        for mod in self._modules.values():
            here = self._named(mod, kernel)
            if len(here) > 1:
                return None
            found += here
        if found and all((f.opcode, f.op_name) == (found[0].opcode, found[0].op_name) for f in found):
            return found[0]
        return None

    def lookup_launch(self, kernels: list[str], program_id=None, module=None) -> list[HloOpInfo | None]:
        """The ops of one command-buffer launch's kernels, given in the order they ran: by their place
        in a stretch of a scheduled computation (`launch_align.align`; None where the place is
        ambiguous: one layer's kernels fit every layer alike). Where the launch fits no schedule,
        by `lookup_kernel`, except a name launched more than once here (a reused kernel: its
        instruction is one of them)."""
        ops = self._ops(program_id, module)
        placed = None
        if ops is not None and len(kernels) > 1:
            key = (id(ops), tuple(kernels))
            if key not in self._aligned:
                self._aligned[key] = align(kernels, self._modules[id(ops)].fit)
            placed = self._aligned[key]
        if placed is not None:
            orders = self._modules[id(ops)].fit.orders
            return [ops[orders[p[0]][p[1]]] if p is not None else None for p in placed]
        counts: dict[str, int] = {}
        for k in kernels:
            counts[k] = counts.get(k, 0) + 1
        return [self.lookup_kernel(k, program_id, module) if counts[k] == 1 else None for k in kernels]

    @property
    def module_names(self) -> list[str]:
        return sorted(self._by_module)

    def __len__(self) -> int:
        return len(self._by_module)


# --- protobuf wire format -------------------------------------------------------------

def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value); length-delimited values are memoryviews."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:  # groups (3/4) are not used by these protos
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _text(v) -> str:
    return bytes(v).decode("utf-8", "replace")


def _packed_varints(v, wire: int) -> list[int]:
    if wire == 0:
        return [v]
    out, i, buf = [], 0, v
    while i < len(buf):
        x, i = _varint(buf, i)
        out.append(x)
    return out


# --- HloProto ---------------------------------------------------------------------------

@dataclasses.dataclass
class _RawInstr:
    name: str = ""
    opcode: str = ""
    op_name: str = ""
    custom_call_target: str = ""
    called: list[int] = dataclasses.field(default_factory=list)
    id: int | None = None
    backend_kernel: str = ""
    shape: bytes = b""


def _parse_instruction(buf: memoryview) -> _RawInstr:
    ins = _RawInstr()
    backend_config = None
    for f, w, v in _fields(buf):
        if f == _INSTR_NAME:
            ins.name = _text(v)
        elif f == _INSTR_OPCODE:
            ins.opcode = _text(v)
        elif f == _INSTR_SHAPE:
            ins.shape = bytes(v)
        elif f == _INSTR_METADATA:
            for mf, _, mv in _fields(v):
                if mf == _OPMETA_OP_NAME:
                    ins.op_name = _text(mv)
        elif f == _INSTR_CUSTOM_CALL_TARGET:
            ins.custom_call_target = _text(v)
        elif f == _INSTR_CALLED_COMPUTATIONS:
            ins.called.extend(_packed_varints(v, w))
        elif f == _INSTR_ID:
            ins.id = v
        elif f == _INSTR_BACKEND_CONFIG:
            backend_config = v
    if backend_config is not None and "triton" in ins.custom_call_target:
        # the name follows the (long, escaped) Triton IR: the last match is the attribute's
        names = _BACKEND_KERNEL_RE.findall(_text(backend_config))
        ins.backend_kernel = names[-1] if names else ""
    return ins


def _schedule(buf: memoryview) -> dict[int, list[int]]:
    """HloScheduleProto: computation id -> instruction ids in execution order."""
    out = {}
    for f, _, entry in _fields(buf):
        if f != _SCHEDULE_SEQUENCES:
            continue
        comp, ids = None, []
        for ef, _, ev in _fields(entry):
            if ef == _MAP_KEY:
                comp = ev
            elif ef == _MAP_VALUE:
                for sf, sw, sv in _fields(ev):
                    if sf == _SEQUENCE_IDS:
                        ids += _packed_varints(sv, sw)
        if comp is not None:
            out[comp] = ids
    return out


def _launches(opcode: str) -> bool:
    return opcode not in _NO_LAUNCH and not opcode.endswith("-done")


def parse_hlo_proto(data: bytes | memoryview) -> tuple[str, dict[str, HloOpInfo], list[list[str]]]:
    """Module name, ``{instruction name: HloOpInfo}`` and the launch orders for a serialized
    ``HloProto``: per computation the device runs through the schedule (the entry computation first,
    then the bodies and branches of its control flow), the names of its instructions
    that launch device work, in the module's schedule (none without one)."""
    module_name = ""
    computations: dict[int, list[_RawInstr]] = {}
    entry_id, schedule = None, {}
    for f, _, v in _fields(memoryview(data)):
        if f != _HLOPROTO_MODULE:
            continue
        for mf, _, mv in _fields(v):
            if mf == _MODULE_NAME:
                module_name = _text(mv)
            elif mf == _MODULE_ENTRY_ID:
                entry_id = mv
            elif mf == _MODULE_SCHEDULE:
                schedule = _schedule(mv)
            elif mf == _MODULE_COMPUTATIONS:
                comp_id, instrs = None, []
                for cf, _, cv in _fields(mv):
                    if cf == _COMP_INSTRUCTIONS:
                        instrs.append(_parse_instruction(cv))
                    elif cf == _COMP_ID:
                        comp_id = cv
                if comp_id is not None:
                    computations[comp_id] = instrs

    def inlined(comp_ids, seen) -> tuple[set[str], list[str]]:
        """Opcodes and op_names of the computations a fusion (or async op) runs."""
        opcodes, names = set(), []
        for cid in comp_ids:
            if cid in seen or cid not in computations:
                continue
            seen.add(cid)
            for ins in computations[cid]:
                opcodes.add(ins.opcode)
                if ins.op_name:
                    names.append(ins.op_name)
                if ins.opcode in _INLINED_CALLERS:
                    sub_ops, sub_names = inlined(ins.called, seen)
                    opcodes |= sub_ops
                    names += sub_names
        return opcodes, names

    ops: dict[str, HloOpInfo] = {}
    for instrs in computations.values():
        for ins in instrs:
            fused_ops, fused_names = set(), []
            if ins.opcode in _INLINED_CALLERS:
                fused_ops, fused_names = inlined(ins.called, set())
            ops[ins.name] = HloOpInfo(
                name=ins.name,
                opcode=ins.opcode,
                op_name=ins.op_name,
                custom_call_target=ins.custom_call_target,
                fused_opcodes=frozenset(fused_ops),
                fused_op_names=tuple(dict.fromkeys(fused_names)),
                backend_kernel=ins.backend_kernel,
                shape=ins.shape,
            )
    return module_name, ops, _launch_orders(computations, entry_id, schedule)


def _launch_orders(computations: dict[int, list[_RawInstr]], entry_id, schedule) -> list[list[str]]:
    """The launching instructions of the entry computation and of every computation its control flow
    runs (a conditional's branches, a loop's body: each runs its own command buffers), in schedule
    order, breadth first from the entry."""
    orders, seen, todo = [], set(), [entry_id]
    while todo:
        cid = todo.pop(0)
        if cid in seen or cid not in schedule:
            continue
        seen.add(cid)
        by_id = {ins.id: ins for ins in computations.get(cid, []) if ins.id is not None}
        run = [by_id[i] for i in schedule[cid] if i in by_id]
        orders.append([ins.name for ins in run if _launches(ins.opcode)])
        todo += [c for ins in run if ins.opcode in _CONTROL_FLOW for c in ins.called]
    return orders


# --- XSpace -----------------------------------------------------------------------------

def _plane_name(plane: memoryview) -> str:
    for f, _, v in _fields(plane):
        if f == _XPLANE_NAME:
            return _text(v)
    return ""


def hlo_index_from_xspace(data: bytes | memoryview) -> HloIndex:
    """Index of every HLO module stored on the xspace's ``/host:metadata`` plane."""
    index = HloIndex()
    for f, _, plane in _fields(memoryview(data)):
        if f != _XSPACE_PLANES or _plane_name(plane) != METADATA_PLANE:
            continue
        stat_names: dict[int, str] = {}
        event_metas = []
        for pf, _, pv in _fields(plane):
            if pf == _XPLANE_STAT_METADATA:
                for ef, _, ev in _fields(pv):
                    if ef == _MAP_VALUE:
                        sid, sname = None, ""
                        for sf, _, sv in _fields(ev):
                            if sf == _XSTATMETA_ID:
                                sid = sv
                            elif sf == _XSTATMETA_NAME:
                                sname = _text(sv)
                        if sid is not None:
                            stat_names[sid] = sname
            elif pf == _XPLANE_EVENT_METADATA:
                for ef, _, ev in _fields(pv):
                    if ef == _MAP_VALUE:
                        event_metas.append(ev)
        for meta in event_metas:
            proto, program_id = None, None
            for mf, _, mv in _fields(meta):
                if mf != _XEVENTMETA_STATS:
                    continue
                stat = {sf: sv for sf, _, sv in _fields(mv)}
                name = stat_names.get(stat.get(_XSTAT_METADATA_ID), "")
                if name == "Hlo Proto" and _XSTAT_BYTES in stat:
                    proto = stat[_XSTAT_BYTES]
                elif name == "program_id":
                    program_id = stat.get(_XSTAT_UINT64, stat.get(_XSTAT_INT64))
            if proto is not None:
                module_name, ops, orders = parse_hlo_proto(proto)
                index.add_module(module_name, program_id, ops, orders)
    return index
