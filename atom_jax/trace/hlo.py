"""Collective/GEMM overlap check over scheduled (post-optimisation) HLO text.

Input is what ``jax.jit(f).lower(*args).compile().as_text()`` returns: the module
after XLA's scheduler, so instruction order inside each computation is the order
the GPU stream sees. An async collective (``X-start`` ... ``X-done``) hides its
communication only if compute is issued between the two; for the MoE layers the
compute we want there is a GEMM. This module finds every collective, pairs start
with done, and counts the GEMM-bearing instructions scheduled in between.

Pure text parsing: no jax import except in :func:`compiled_text`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

# Collective opcodes (the HLO spelling). Each may appear plain (synchronous),
# as a native or sugared ``-start``/``-done`` pair, or wrapped by async-start.
COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
# The MoE data movement whose latency must hide behind expert GEMMs.
MOE_KINDS = ("all-gather", "reduce-scatter", "all-reduce")

_GEMM_TARGET_RE = re.compile(r"gemm|cublas|matmul", re.IGNORECASE)
_KERNEL_TARGET_RE = re.compile(r"triton|mosaic", re.IGNORECASE)
_GEMM_KERNEL_NAME_RE = re.compile(r'(?:name\s*=\s*\\?"|op_name="[^"]*/)[^"/]*(?:gemm|matmul|ragged_dot)',
                                  re.IGNORECASE)
# Called-computation attributes; ``{...}`` lists are used by conditionals.
_CALLED_RE = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)"
    r"=(\{[^}]*\}|%?[\w.\-]+)"
)
_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMP_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->\s*.*?)?\s*\{\s*$")
_INSTR_HEAD_RE = re.compile(r"^(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE_RE = re.compile(r"\s*([a-z][\w\-]*)\(")

# Bits per element; sub-byte types (fp4, int4) are packed.
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
    "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
    "f4e2m1fn": 4,
}


def _dtype_bits(dtype: str) -> int | None:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    if dtype.startswith("f8"):  # f8e4m3fn, f8e5m2, f8e4m3fnuz, ...
        return 8
    return None


def shape_bytes(type_text: str) -> int | None:
    """Total bytes of every array in an HLO type (array or tuple); None if unknown."""
    total_bits = 0
    found = False
    for dtype, dims in _SHAPE_RE.findall(type_text):
        bits = _dtype_bits(dtype)
        if bits is None:
            continue
        found = True
        n = 1
        for d in dims.split(","):
            d = d.strip().lstrip("<=")  # bounded dynamic dims print as <=N
            if not d:
                continue
            if not d.isdigit():  # unbounded dynamic dim "?"
                return None
            n *= int(d)
        total_bits += n * bits
    return (total_bits + 7) // 8 if found else None


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    type_text: str
    operands: list[str]
    attrs: str  # everything after the operand list (attributes, metadata, backend_config)
    called: list[str]  # names of computations referenced by calls=/to_apply=/body=/...

    @property
    def op_name(self) -> str | None:
        """JAX source op path from metadata, handy to map back to Python."""
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else None


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction]


def _matching_close(text: str, start: int) -> int:
    """Index of the bracket closing text[start] ('(' or '{'), respecting nesting."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
    return len(text) - 1


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _parse_instruction(line: str) -> Instruction | None:
    head = _INSTR_HEAD_RE.match(line)
    if not head:
        return None
    pos = head.end()
    # The result type: a tuple "( ... )" (may hold spaces and /*index=N*/) or one token.
    if line.startswith("(", pos):
        end = _matching_close(line, pos)
        type_text, pos = line[pos : end + 1], end + 1
    else:
        m = re.match(r"\S+", line[pos:])
        if not m:
            return None
        type_text, pos = m.group(0), pos + m.end()
    op = _OPCODE_RE.match(line, pos)
    if not op:
        return None
    open_paren = op.end() - 1
    close_paren = _matching_close(line, open_paren)
    # Operands print as "%x" or "bf16[8]{0} %x" (or without '%'): the name is the last token.
    operands = []
    for part in _split_top_level(line[open_paren + 1 : close_paren]):
        tokens = re.sub(r"/\*.*?\*/", " ", part).split()  # drop /*index=5*/ markers
        if tokens:
            operands.append(tokens[-1].lstrip("%"))
    attrs = line[close_paren + 1 :]
    called = []
    for _, value in _CALLED_RE.findall(attrs):
        called.extend(v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip())
    return Instruction(head.group(2), op.group(1), type_text, operands, attrs, called)


def parse_hlo_module(text: str) -> dict[str, Computation]:
    """Computations by name, instructions in printed (= scheduled) order."""
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if current is None:
            m = _COMP_HEADER_RE.match(line)
            # Module header lines (HloModule ..., FileNames ...) never end in '{' alone.
            if m and "=" not in line.split("(", 1)[0]:
                current = Computation(m.group(2), bool(m.group(1)), [])
            continue
        if line.startswith("}"):
            comps[current.name] = current
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            current.instructions.append(instr)
    return comps


@dataclasses.dataclass
class CollectiveOverlap:
    kind: str  # collective opcode: all-gather, reduce-scatter, ...
    name: str  # the start instruction (or the plain collective)
    done: str | None  # the matching done; None for synchronous or unpaired ones
    computation: str
    form: str  # "sync" | "fusion-sync" | "start-done" | "async-start-done" | "fusion-start-done"
    is_sync: bool  # plain collective or backend_config "is_sync":true
    gemms_between: int
    instructions_between: int
    gemm_names: list[str]
    shape: str | None  # result type of the collective (the done's type for async pairs)
    bytes: int | None
    op_name: str | None

    @property
    def overlapped(self) -> bool:
        return (not self.is_sync) and self.gemms_between > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overlapped"] = self.overlapped
        return d


@dataclasses.dataclass
class OverlapReport:
    collectives: list[CollectiveOverlap]

    @property
    def total(self) -> int:
        return len(self.collectives)

    @property
    def overlapped(self) -> int:
        return sum(c.overlapped for c in self.collectives)

    @property
    def sync_count(self) -> int:
        return sum(c.is_sync for c in self.collectives)

    def not_overlapped(
        self, kinds: Iterable[str] = MOE_KINDS, min_bytes: int = 0
    ) -> list[CollectiveOverlap]:
        """Collectives of these kinds (at least min_bytes, if the size is known) left exposed."""
        kinds = tuple(kinds)
        return [
            c
            for c in self.collectives
            if c.kind in kinds and not c.overlapped and (c.bytes is None or c.bytes >= min_bytes)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {"total": self.total, "overlapped": self.overlapped, "sync": self.sync_count},
            "collectives": [c.to_dict() for c in self.collectives],
        }

    def format_table(self) -> str:
        header = ("kind", "name", "computation", "form", "sync", "gemms", "instrs", "bytes", "overlap")
        rows = [
            (
                c.kind,
                c.name,
                c.computation,
                c.form,
                "yes" if c.is_sync else "no",
                str(c.gemms_between),
                str(c.instructions_between),
                "?" if c.bytes is None else str(c.bytes),
                "YES" if c.overlapped else "no",
            )
            for c in self.collectives
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        lines = [ln.rstrip() for ln in lines]
        lines.append(
            f"collectives: {self.total}  overlapped: {self.overlapped}  sync: {self.sync_count}"
        )
        return "\n".join(lines)


class _Analyzer:
    def __init__(self, comps: dict[str, Computation]):
        self.comps = comps
        self._gemm_memo: dict[str, bool] = {}

    def computation_has_gemm(self, name: str) -> bool:
        """A computation holds a GEMM directly or in anything it calls (nested fusions, loops).

        HLO call graphs are acyclic, so plain memoised recursion terminates."""
        if name not in self._gemm_memo:
            comp = self.comps.get(name)
            self._gemm_memo[name] = comp is not None and any(self.is_gemm(i) for i in comp.instructions)
        return self._gemm_memo[name]

    def is_gemm(self, instr: Instruction) -> bool:
        if instr.opcode == "dot":
            return True
        if instr.opcode in ("custom-call", "custom-call-start"):
            m = re.search(r'custom_call_target="([^"]*)"', instr.attrs)
            if m and _GEMM_TARGET_RE.search(m.group(1)):
                return True
            # Hand-written kernels (Pallas on Triton or Mosaic GPU, e.g. our grouped GEMM) are
            # opaque custom calls: they count when their kernel name or op_name says GEMM.
            if m and _KERNEL_TARGET_RE.search(m.group(1)) and _GEMM_KERNEL_NAME_RE.search(instr.attrs):
                return True
        if instr.opcode == "fusion":
            # kCustom GEMM fusions name themselves: "__triton_gemm", "__triton_nested_gemm_fusion"
            m = re.search(r'"kind"\s*:\s*"([^"]*)"', instr.attrs)
            if m and _GEMM_TARGET_RE.search(m.group(1)):
                return True
        # Fusions (kLoop/kOutput/kCustom), calls, loops and async compute count if their
        # callees hold a GEMM. Collective reducers (to_apply=%add) never do.
        if instr.opcode in ("fusion", "call", "while", "conditional", "async-start", "custom-call"):
            return any(self.computation_has_gemm(c) for c in instr.called)
        return False

    def wrapped_collective(self, instr: Instruction) -> Instruction | None:
        """For async-start / fusion-start / fusion: the collective in its called computation."""
        for cname in instr.called:
            comp = self.comps.get(cname)
            for inner in comp.instructions if comp else ():
                if inner.opcode in COLLECTIVE_KINDS:
                    return inner
        return None


# Ops whose called computation *is* the work (not a schedule of its own): a collective
# inside it belongs to the wrapping op. XLA GPU emits async-start (reduce-scatter,
# all-to-all wrappers) and fusion-start / fusion (Triton collective kernels, e.g.
# all-reduce with kind=kCustom "__triton_collective").
_WRAPPER_OPS = ("async-start", "async-update", "async-done", "fusion-start", "fusion-done", "fusion")
_ASYNC_WRAPPER_STARTS = {"async-start": "async-start-done", "fusion-start": "fusion-start-done"}


def _classify_start(an: _Analyzer, instr: Instruction) -> tuple[str, str, Instruction] | None:
    """(kind, form, op carrying the collective's attributes) if instr starts an async collective."""
    base = instr.opcode[: -len("-start")] if instr.opcode.endswith("-start") else None
    if base in COLLECTIVE_KINDS:  # native all-gather-start, or sugared reduce-scatter-start
        return base, "start-done", instr
    if instr.opcode in _ASYNC_WRAPPER_STARTS:
        inner = an.wrapped_collective(instr)
        if inner is not None:
            return inner.opcode, _ASYNC_WRAPPER_STARTS[instr.opcode], inner
    return None


def _marked_sync(instr: Instruction) -> bool:
    return re.search(r'"is_sync"\s*:\s*true', instr.attrs) is not None


def _sync_record(comp: Computation, ins: Instruction, kind: str, form: str, inner: Instruction):
    return CollectiveOverlap(
        kind=kind, name=ins.name, done=None, computation=comp.name, form=form, is_sync=True,
        gemms_between=0, instructions_between=0, gemm_names=[], shape=ins.type_text,
        bytes=shape_bytes(ins.type_text), op_name=ins.op_name or inner.op_name,
    )


def analyze_hlo(text: str) -> OverlapReport:
    """Every collective in the module with the GEMMs scheduled between its start and done."""
    comps = parse_hlo_module(text)
    an = _Analyzer(comps)
    # Skip wrapped computations: their collective is reported at the wrapping op, and
    # their inner plain op must not also count as a synchronous collective.
    wrapped = {
        name
        for comp in comps.values()
        for ins in comp.instructions
        if ins.opcode in _WRAPPER_OPS
        for name in ins.called
    }
    found: list[CollectiveOverlap] = []
    for comp in comps.values():  # ENTRY, while bodies/conditions, call/conditional targets
        if comp.name in wrapped:
            continue
        instrs = comp.instructions
        index = {ins.name: k for k, ins in enumerate(instrs)}
        # start name -> (position, kind, form, op holding the collective's attributes)
        pending: dict[str, tuple[int, str, str, Instruction]] = {}
        records: list[tuple[int, CollectiveOverlap]] = []  # keyed by start position
        for k, ins in enumerate(instrs):
            if ins.opcode in COLLECTIVE_KINDS:
                records.append((k, _sync_record(comp, ins, ins.opcode, "sync", ins)))
                continue
            if ins.opcode == "fusion":  # a collective kernel launched inline: blocking
                inner = an.wrapped_collective(ins)
                if inner is not None:
                    records.append((k, _sync_record(comp, ins, inner.opcode, "fusion-sync", inner)))
                continue
            started = _classify_start(an, ins)
            if started is not None:
                pending[ins.name] = (k, *started)
                continue
            if not ins.opcode.endswith("-done") or not ins.operands:
                continue
            # Follow the done's operand back through any -update ops to its start.
            src = ins.operands[0]
            while src in index and instrs[index[src]].opcode.endswith("-update"):
                update = instrs[index[src]]
                if not update.operands:
                    break
                src = update.operands[0]
            if src in pending:  # else: done of a non-collective async op (copy, dynamic-slice)
                pos, kind, form, inner = pending.pop(src)
                records.append((pos, _pair_record(an, comp, pos, k, kind, form, inner)))
        # A start whose done is elsewhere (cross-iteration pipelining): count to the end.
        for pos, kind, form, inner in pending.values():
            records.append((pos, _pair_record(an, comp, pos, None, kind, form, inner)))
        found.extend(rec for _, rec in sorted(records, key=lambda t: t[0]))
    return OverlapReport(found)


def _pair_record(
    an: _Analyzer, comp: Computation, start_pos: int, done_pos: int | None, kind: str, form: str,
    inner: Instruction,
) -> CollectiveOverlap:
    instrs = comp.instructions
    start = instrs[start_pos]
    between = instrs[start_pos + 1 : done_pos if done_pos is not None else len(instrs)]
    gemms = [i.name for i in between if an.is_gemm(i)]
    done = instrs[done_pos] if done_pos is not None else None
    # The done's type is the collective's result; a start's type is an (in, out) tuple.
    shape = done.type_text if done is not None else start.type_text
    return CollectiveOverlap(
        kind=kind, name=start.name, done=done.name if done else None, computation=comp.name,
        form=form, is_sync=_marked_sync(start) or _marked_sync(inner), gemms_between=len(gemms),
        instructions_between=len(between), gemm_names=gemms, shape=shape,
        bytes=shape_bytes(shape), op_name=start.op_name or inner.op_name,
    )


@dataclasses.dataclass(frozen=True)
class LargeConstant:
    computation: str
    name: str
    type_text: str  # e.g. "s32[8192,2688]{1,0}"
    bytes: int
    op_name: str | None  # the JAX op it was folded from, when XLA kept the metadata


def large_constants(text: str, min_bytes: int = 1 << 20) -> list[LargeConstant]:
    """Constant instructions of at least `min_bytes` in compiled HLO text, largest first.
    XLA's constant folding turns an all-constant subgraph (an iota padded or concatenated
    with constants, say) into a literal embedded in the executable: compile time (XLA
    evaluates it on the host) and executable size per occurrence."""
    found = []
    for comp in parse_hlo_module(text).values():
        for ins in comp.instructions:
            if ins.opcode != "constant":
                continue
            size = shape_bytes(ins.type_text)
            if size is not None and size >= min_bytes:
                found.append(LargeConstant(comp.name, ins.name, ins.type_text, size, ins.op_name))
    return sorted(found, key=lambda c: -c.bytes)


def compiled_text(fn: Callable, *args: Any) -> str:
    """Scheduled HLO of fn on args (jitting it first unless it already is)."""
    import jax

    lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
    return lowerable.lower(*args).compile().as_text()
