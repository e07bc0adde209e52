"""A census of the bytes and FLOPs a lowered program moves, per decoder layer and op family,
from its StableHLO (before XLA's fusion): where a step's memory traffic can go.

Each op the program runs (`op_counts.walk_stablehlo`: a called function's ops at every
call site) is weighted by how often it runs: a `while` with a constant bound (fori_loop,
lax.map, scan) multiplies its body by its trip count; a `case` on a computed index (the
indexer's rung switch) counts only the branch `branch(n_branches)` picks (default the last:
the widest rung). Bytes per run, by family:
- dot_general: its operands read and its result written (and 2 x MACs FLOPs);
- gather, slice, dynamic_slice, pad, concatenate, transpose: the result read and written (a
  copy; XLA may fuse a slice or pad into its consumer: an upper bound);
- scatter, dynamic_update_slice: the update read and written (in place; a scatter into an
  operand XLA cannot alias costs a copy of the whole operand on top, not counted);
- reduce, reduce_window, sort, top_k, collectives: operands read, results written;
- custom calls (Pallas kernels): their results written (they read parts of operands such as
  whole cache pools; their reads are not knowable from the HLO), plus `kernel_reads`' count
  (default: a grouped GEMM's expert weights, read whole in prefill);
- elementwise: their results, an upper bound of what a fusion materialises ("convert" apart:
  dtype casts, e.g. float32 upcasts of bf16 operands).
`top_ops` lists the single largest movers with their name stack, to find them in the model.

Lower layers only: jax and trace/op_counts."""

from __future__ import annotations

import collections
import dataclasses
import re

from atom_jax.trace.op_counts import (ELEMENTWISE, SHAPE, _attr_str, _constant_index, _location_text, layer_order,
                                      stablehlo_kind, walk_stablehlo)

_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4, "ui32": 4, "i16": 2, "ui16": 2,
             "i8": 1, "ui8": 1, "i1": 1, "f8E4M3FN": 1, "f8E5M2": 1, "f8E4M3FNUZ": 1, "f8E5M2FNUZ": 1, "f8E8M0FNU": 1,
             "i4": 1, "ui4": 1, "f4E2M1FN": 1}
_TENSOR_RE = re.compile(r"tensor<((?:\d+x)*)([a-zA-Z0-9]+)>")
_COPY_KINDS = {"gather", "slice", "dynamic_slice", "pad", "concatenate", "transpose"}
_UPDATE_KINDS = {"scatter", "dynamic_update_slice"}
_READ_WRITE_KINDS = {"reduce", "reduce_window", "sort", "top_k", "all_gather", "reduce_scatter", "all_reduce",
                     "all_to_all", "collective_permute", "cumsum", "select_and_scatter"}
CONVERT = "convert"


def tensor_bytes(type_text: str) -> int:
    """Bytes of a `tensor<AxBxdtype>` type (0 for tokens, tuples and unknown element types)."""
    m = _TENSOR_RE.fullmatch(type_text.strip())
    if not m:
        return 0
    n = 1
    for d in m.group(1).split("x")[:-1]:
        n *= int(d)
    return n * _ITEMSIZE.get(m.group(2), 0)


def _bytes_of(values) -> int:
    return sum(tensor_bytes(str(v.type)) for v in values)


def _dims(type_text: str) -> list[int]:
    m = _TENSOR_RE.fullmatch(type_text.strip())
    return [int(d) for d in m.group(1).split("x")[:-1]] if m else []


def dot_flops(op) -> float:
    """2 x MACs of a dot_general: result elements x the contracted size of the lhs."""
    lhs = _dims(str(op.operation.operands[0].type))
    m = re.search(r"lhs_contracting_dimensions = \[([\d, ]*)\]", str(op.operation.attributes["dot_dimension_numbers"]))
    k = 1
    for i in (int(x) for x in (m.group(1).split(",") if m and m.group(1).strip() else [])):
        k *= lhs[i]
    out = 1
    for d in _dims(str(op.operation.results[0].type)):
        out *= d
    return 2.0 * out * k


def family(name: str, kind: str) -> str:
    """The census family of an op: its `stablehlo_kind`, with dtype casts apart from the other
    elementwise ops and Triton kernels as "kernel"."""
    if kind == ELEMENTWISE and name == "stablehlo.convert":
        return CONVERT
    if kind.startswith("custom_call"):
        return "kernel" if kind == "custom_call:triton" else kind
    return kind


def op_cost(op, kind: str) -> tuple[int, float]:
    """(bytes, FLOPs) of one run of `op` (see the module)."""
    o = op.operation
    if kind in ("dot_general", "dot"):
        return _bytes_of(o.operands) + _bytes_of(o.results), dot_flops(op)
    if kind in _COPY_KINDS:
        return 2 * _bytes_of(o.results), 0.0
    if kind == "scatter":
        return 2 * _bytes_of(list(o.operands)[-1:]), 0.0
    if kind == "dynamic_update_slice":
        return 2 * _bytes_of(list(o.operands)[1:2]), 0.0
    if kind in _READ_WRITE_KINDS:
        return _bytes_of(o.operands) + _bytes_of(o.results), 0.0
    if kind.startswith("custom_call") or kind == ELEMENTWISE:
        return _bytes_of(o.results), 0.0
    return 0, 0.0


def _trip_count(op) -> int | None:
    """A while loop's constant bound (`iter < constant` in its cond), else None."""
    cond = op.operation.regions[0]
    for block in cond.blocks:
        for inner in block.operations:
            if inner.operation.name == "stablehlo.constant":
                m = re.search(r"dense<(\d+)>", str(inner.operation.attributes["value"]))
                if m:
                    return int(m.group(1))
    return None


@dataclasses.dataclass
class Row:
    scope: str
    family: str
    times: int  # runs per step
    bytes: int  # per run
    flops: float  # per run
    type_text: str  # the result type(s)
    where: str  # name stack


def grouped_gemm_flops(name: str, operands: list[list[int]], results: list[list[int]]) -> float:
    """2 x MACs of a grouped GEMM kernel (its name holds "grouped_gemm"): rows [R, K] (the first
    rank-2 operand) against expert weights (a rank-3 operand) -> [M, N]; else 0. K is the rows',
    not the weights': packed FP4 codes hold K/2 bytes ([E, K/2, N], or [E, N, K/2] K-major)."""
    weights = [d for d in operands if len(d) == 3]
    rows = [d for d in operands if len(d) == 2]
    if "grouped_gemm" not in name or not weights or not results or len(results[0]) != 2:
        return 0.0
    m, n = results[0]
    k = rows[0][1] if rows else weights[0][1]
    return 2.0 * m * k * n


def grouped_gemm_reads(name: str, operand_types: list[str]) -> int:
    """Bytes a grouped GEMM kernel must read besides its rows: its expert weights (the rank-3
    operand) once, when every expert has rows (prefill; at least once per row tile of an
    expert unless the L2 keeps them); 0 for other kernels."""
    if "grouped_gemm" not in name:
        return 0
    return sum(tensor_bytes(t) for t in operand_types if len(_dims(t)) == 3)


def census_ops(module, branch=lambda n: n - 1, kernel_flops=grouped_gemm_flops, kernel_reads=grouped_gemm_reads):
    """Every costed op of the program's @main as a Row (see the module). `branch(n)`: the branch
    of a `case` with a computed index that runs (default the last). kernel_flops(name, operand
    dims, result dims) -> FLOPs of a custom call (a Pallas kernel: its name stack, e.g.
    "grouped_gemm/pallas_call ..."); kernel_reads(name, operand types) -> bytes it reads on top
    of the results it writes (default: a grouped GEMM's expert weights)."""
    rows, notes = [], []

    def descend(op, scope):  # control flow's regions; other ops' (reductions', sorts' bodies) are scalar
        regions = list(op.operation.regions)
        if op.operation.name == "stablehlo.while":
            trips = _trip_count(op)
            if trips is None:
                notes.append(f"while ({scope}) without a constant bound: its body counted once")
            return [(regions[1], trips or 1)]
        if op.operation.name == "stablehlo.case":
            taken = _constant_index(op)
            if taken is None and len(regions) > 1:
                taken = branch(len(regions))
                notes.append(f"case ({scope}, {len(regions)} branches): branch {taken} counted")
            return [(regions[taken if taken is not None else 0], 1)]
        return []

    for scope, op, mult in walk_stablehlo(module, descend):
        name = op.operation.name
        if name in ("stablehlo.while", "stablehlo.case"):  # their bodies' ops are costed
            continue
        target = _attr_str(op, "call_target_name") if name.endswith("custom_call") else None
        kind = stablehlo_kind(name, target)
        if kind == SHAPE:
            continue
        nbytes, flops = op_cost(op, kind)
        where = _name_stack(_location_text(op))
        if kind.startswith("custom_call") and kernel_flops is not None:
            flops = kernel_flops(where, [_dims(str(v.type)) for v in op.operation.operands],
                                 [_dims(str(v.type)) for v in op.operation.results])
        if kind.startswith("custom_call") and kernel_reads is not None:
            nbytes += kernel_reads(where, [str(v.type) for v in op.operation.operands])
        if nbytes or flops:
            types = ", ".join(str(r.type) for r in op.operation.results)
            rows.append(Row(scope, family(name, kind), mult, nbytes, flops, types, where))
    return rows, notes


def _name_stack(loc: str, sites: int = 3) -> str:
    """An op's location as "primitive @ function file:line < caller file:line ..." (the
    innermost `sites` frames of its call stack)."""
    m = re.search(r'loc\("([^"]*)"', loc)
    name = re.sub(r"^(jit\([^)]*\)/)+", "", m.group(1) if m else loc)
    frames = re.findall(r'"([^"]+)"\("([^"]+)":(\d+)', loc)[:sites]
    return name + "".join(f" {'@' if i == 0 else '<'} {fn} {path.rsplit('/', 1)[-1]}:{line}"
                          for i, (fn, path, line) in enumerate(frames))


def census_table(rows) -> dict[str, dict[str, list[float]]]:
    """{scope: {family: [bytes per step, FLOPs per step, ops]}}."""
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0.0, 0]))
    for r in rows:
        cell = table[r.scope][r.family]
        cell[0] += r.bytes * r.times
        cell[1] += r.flops * r.times
        cell[2] += r.times
    return {s: dict(v) for s, v in table.items()}


def format_census(table, gbps: float = 4000.0, tflops: float = 790.0) -> str:
    """Rows: families (most bytes first); columns: MiB per scope, then the total with its time at
    `gbps` (and FLOPs at `tflops`)."""
    scopes = layer_order(table)
    fams = collections.Counter()
    flops = collections.Counter()
    for s in scopes:
        for f, (b, fl, _) in table[s].items():
            fams[f] += b
            flops[f] += fl
    width = max([6] + [len(f) for f in fams])
    head = f"{'family':<{width}} " + " ".join(f"{s + ' MiB':>12}" for s in scopes) + \
        f" {'all MiB':>10} {'ms@' + str(int(gbps)) + 'GB/s':>12} {'GFLOP':>9} {'ms@' + str(int(tflops)) + 'TF':>10}"
    lines = [head, "-" * len(head)]
    for f, b in fams.most_common():
        cells = " ".join(f"{table[s].get(f, [0, 0, 0])[0] / 2**20:>12.0f}" for s in scopes)
        lines.append(f"{f:<{width}} {cells} {b / 2**20:>10.0f} {b / gbps / 1e6:>12.2f} {flops[f] / 1e9:>9.0f} "
                     f"{flops[f] / tflops / 1e9:>10.2f}")
    tb, tf = sum(fams.values()), sum(flops.values())
    cells = " ".join(f"{sum(c[0] for c in table[s].values()) / 2**20:>12.0f}" for s in scopes)
    lines.append(f"{'total':<{width}} {cells} {tb / 2**20:>10.0f} {tb / gbps / 1e6:>12.2f} {tf / 1e9:>9.0f} "
                 f"{tf / tflops / 1e9:>10.2f}")
    return "\n".join(lines)


def top_ops(rows, n: int = 30, families=None) -> list[Row]:
    """The n ops moving the most bytes per step (times x bytes), optionally of some families."""
    pick = [r for r in rows if families is None or r.family in families]
    return sorted(pick, key=lambda r: -r.bytes * r.times)[:n]
