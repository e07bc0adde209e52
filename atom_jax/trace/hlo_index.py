"""HLO modules embedded in an ``*.xplane.pb``, indexed by instruction name.

The profiler stores each compiled module's ``HloProto`` on the ``/host:metadata``
plane (one event-metadata entry per program, stats ``Hlo Proto`` and
``program_id``). Device events only carry ``hlo_op`` / ``hlo_module`` /
``program_id`` stats, so this index is how a kernel named ``loop_fusion_3`` or
``ynn_fusion.1`` is traced back to the ``dot`` it computes and to the
``jax.named_scope`` (``.../mb_a/...``) it was written under.

``jax.profiler.ProfileData`` does not expose plane metadata, and jaxlib ships no
generated protobuf classes, so this decodes the few fields needed straight from
the protobuf wire format. Field numbers are those of ``xplane.proto`` and
``xla/service/hlo.proto``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

# xplane.proto
_XSPACE_PLANES = 1
_XPLANE_NAME, _XPLANE_EVENT_METADATA, _XPLANE_STAT_METADATA = 2, 4, 5
_MAP_KEY, _MAP_VALUE = 1, 2
_XEVENTMETA_NAME, _XEVENTMETA_STATS = 2, 5
_XSTATMETA_ID, _XSTATMETA_NAME = 1, 2
_XSTAT_METADATA_ID, _XSTAT_UINT64, _XSTAT_INT64, _XSTAT_STR, _XSTAT_BYTES = 1, 3, 4, 5, 6
# hlo.proto
_HLOPROTO_MODULE = 1
_MODULE_NAME, _MODULE_COMPUTATIONS = 1, 3
_COMP_INSTRUCTIONS, _COMP_ID = 2, 5
_INSTR_NAME, _INSTR_OPCODE, _INSTR_METADATA = 1, 2, 7
_INSTR_CUSTOM_CALL_TARGET, _INSTR_CALLED_COMPUTATIONS = 28, 38
_OPMETA_OP_NAME = 2

METADATA_PLANE = "/host:metadata"
# Opcodes whose called computations run inside the same kernel(s).
_INLINED_CALLERS = frozenset({"fusion", "async-start", "custom-call"})


@dataclasses.dataclass(frozen=True)
class HloOpInfo:
    name: str
    opcode: str
    op_name: str = ""  # OpMetadata.op_name, e.g. "jit(step)/mb_a/dot_general"
    custom_call_target: str = ""
    fused_opcodes: frozenset[str] = frozenset()
    fused_op_names: tuple[str, ...] = ()  # op_name of every op fused into this one


def _by_kernel_name(ops: dict[str, HloOpInfo]) -> dict[str, list[HloOpInfo]]:
    out: dict[str, list[HloOpInfo]] = {}
    for name, info in ops.items():
        out.setdefault(kernel_name_of(name), []).append(info)
    return out


def kernel_name_of(instruction: str) -> str:
    """The name XLA's GPU backend gives the kernel of a fused instruction: the instruction's name
    with every character outside [A-Za-z0-9_] made '_' (``input_reduce_fusion.65`` ->
    ``input_reduce_fusion_65``, ``gemm_fusion_dot.54`` -> ``gemm_fusion_dot_54``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", instruction)


class HloIndex:
    """``lookup(program_id, module, hlo_op)`` -> :class:`HloOpInfo` or None; ``lookup_kernel(name)``
    for device events that carry no ``hlo_op`` (kernels XLA launched inside a command buffer, a
    CUDA graph, have no per-op annotation): the instruction whose kernel name it is (see
    `lookup_kernel` for which module's)."""

    def __init__(self) -> None:
        self._by_program: dict[int, dict[str, HloOpInfo]] = {}
        self._by_module: dict[str, dict[str, HloOpInfo]] = {}
        # id(a module's ops) -> (those ops, kept so the id stays theirs; kernel name -> ops)
        self._kernels: dict[int, tuple[dict[str, HloOpInfo], dict[str, list[HloOpInfo]]]] = {}

    def add_module(self, module_name: str, program_id: int | None, ops: dict[str, HloOpInfo]) -> None:
        if program_id is not None:
            self._by_program[program_id] = ops
        self._by_module.setdefault(module_name, ops)
        if id(ops) not in self._kernels:
            self._kernels[id(ops)] = ops, _by_kernel_name(ops)

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

    def lookup_kernel(self, kernel: str, program_id=None, module=None) -> HloOpInfo | None:
        """The op whose kernel (`kernel_name_of`) is named `kernel`: in the event's own program or
        module where it names one; else among all indexed modules (a trace holds every bucket's step
        program, whose instructions may share names), the op they agree on: every op of that kernel
        name with the same opcode and op_name, so layer and micro-batch do not depend on which
        program ran. None where a module holds two such ops or the candidates disagree."""
        ops = self._ops(program_id, module)
        if ops is not None:
            found = self._kernels[id(ops)][1].get(kernel, [])
            return found[0] if len(found) == 1 else None
        found = []
        for _, by_name in self._kernels.values():
            here = by_name.get(kernel, [])
            if len(here) > 1:
                return None
            found += here
        if found and all((f.opcode, f.op_name) == (found[0].opcode, found[0].op_name) for f in found):
            return found[0]
        return None

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


def _parse_instruction(buf: memoryview) -> _RawInstr:
    ins = _RawInstr()
    for f, w, v in _fields(buf):
        if f == _INSTR_NAME:
            ins.name = _text(v)
        elif f == _INSTR_OPCODE:
            ins.opcode = _text(v)
        elif f == _INSTR_METADATA:
            for mf, _, mv in _fields(v):
                if mf == _OPMETA_OP_NAME:
                    ins.op_name = _text(mv)
        elif f == _INSTR_CUSTOM_CALL_TARGET:
            ins.custom_call_target = _text(v)
        elif f == _INSTR_CALLED_COMPUTATIONS:
            ins.called.extend(_packed_varints(v, w))
    return ins


def parse_hlo_proto(data: bytes | memoryview) -> tuple[str, dict[str, HloOpInfo]]:
    """Module name and ``{instruction name: HloOpInfo}`` for a serialized ``HloProto``."""
    module_name = ""
    computations: dict[int, list[_RawInstr]] = {}
    for f, _, v in _fields(memoryview(data)):
        if f != _HLOPROTO_MODULE:
            continue
        for mf, _, mv in _fields(v):
            if mf == _MODULE_NAME:
                module_name = _text(mv)
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
            )
    return module_name, ops


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
                module_name, ops = parse_hlo_proto(proto)
                index.add_module(module_name, program_id, ops)
    return index
