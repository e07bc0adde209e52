"""Op counts of a traced program per decoder layer: what one step asks the device to launch.

Three views of one program, each a table {scope: Counter(kind)}, scope = "layer<i>" (the
``trace.capture.layer_scope`` named scope the layer loop puts around each layer, found in the
jaxpr name stack / StableHLO locations / HLO op_name metadata) or STEP (everything else:
input unpacking, embedding, logits, sampling):

- `jaxpr_counts`: jaxpr equations by primitive, nested jaxprs included (a while loop's body
  counted once, under its own primitives);
- `stablehlo_counts`: StableHLO ops by kind (`stablehlo_kind`): the ops that become separate
  GPU kernels keep their name (custom calls by target, sorts, scatters, gathers, reductions,
  dots, collectives, loops...), elementwise ops (which XLA fuses into their neighbours) are
  lumped as ELEMENTWISE, shape-only ops as SHAPE;
- `compiled_launches` / `compiled_counts_of`: the launches of an XLA-compiled module (after fusion): every instruction
  of the entry computation and of the loop / branch bodies it runs, except bookkeeping
  (parameters, tuples, bitcasts...), by opcode (fusions by their kind), a while body's
  launches multiplied by its known trip count. On a GPU module this is the kernel count per
  step (to within cuBLAS / NCCL internals); on CPU it only exercises the parser.

Lower layers only: jax, no atom_jax model code (the decode program is built in
bench/hlo_ops.py)."""

from __future__ import annotations

import collections
import json
import re

from atom_jax.trace.categories import NO_LAYER, layer_of

STEP = NO_LAYER  # ops outside every layer scope
# primitives whose nested jaxpr is a kernel body (one launch), not ops of the program
_KERNEL_PRIMITIVES = {"pallas_call", "triton_kernel_call", "mosaic_gpu_call"}
ELEMENTWISE, SHAPE = "elementwise", "shape"

# StableHLO ops that cost nothing at run time or only reshape / broadcast (XLA folds them)
_SHAPE_OPS = {"reshape", "broadcast_in_dim", "broadcast", "constant", "iota", "bitcast_convert", "get_tuple_element",
              "tuple", "optimization_barrier", "return", "partition_id", "replica_id", "sharding_constraint",
              "custom_call:Sharding", "custom_call:SPMDFullToShardShape", "custom_call:SPMDShardToFullShape",
              "get_dimension_size", "create_token", "after_all"}
# StableHLO ops that lower to their own kernel (or loop of kernels) on a GPU, or decide fusion
# boundaries: kept by name. Everything else is ELEMENTWISE.
_KERNEL_OPS = {"sort", "scatter", "gather", "dynamic_slice", "dynamic_update_slice", "reduce", "reduce_window",
               "select_and_scatter", "dot_general", "dot", "convolution", "while", "case", "if", "all_gather",
               "reduce_scatter", "all_reduce", "all_to_all", "collective_permute", "collective_broadcast",
               "concatenate", "transpose", "pad", "slice", "cumsum", "top_k", "rng_bit_generator", "fft",
               "triangular_solve", "cholesky", "call"}


def scope_of(name_stack: str, outer: str | None = None) -> str:
    """The layer scope named in `name_stack` ("layer<i>"), else `outer` (the enclosing call's
    scope), else STEP. The outermost layer scope wins: a nested function traced once and
    reused by several layers keeps the caller's layer."""
    if outer and outer != STEP:
        return outer
    found = layer_of([name_stack])
    return found if found != NO_LAYER else (outer or STEP)


def _table():
    return collections.defaultdict(collections.Counter)


# ---- jaxpr ------------------------------------------------------------------------------
def jaxpr_counts(closed_jaxpr, platform: str | None = None) -> dict[str, collections.Counter]:
    """Equations by primitive per scope; nested jaxprs (pjit, shard_map, loops, branches,
    custom rules) are walked and counted, not their enclosing equation's primitive alone. A
    per-platform choice (`lax.platform_dependent`: a cond with `branches_platforms`) counts only
    the branch lowered for `platform` (every branch when None)."""
    import jax

    table = _table()

    def walk(jaxpr, outer):
        for eqn in jaxpr.eqns:
            scope = scope_of(str(eqn.source_info.name_stack), outer)
            if eqn.primitive.name == "platform_index":
                continue
            chosen = _platform_branch(eqn, platform)
            if chosen is not None:
                walk(chosen, scope if scope != STEP else outer)
                continue
            table[scope][eqn.primitive.name] += 1
            if eqn.primitive.name in _KERNEL_PRIMITIVES:
                continue
            subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
            for sub in subs:
                walk(sub, scope if scope != STEP else outer)

    walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), None)
    return dict(table)


def _platform_branch(eqn, platform):
    """The jaxpr of the branch a `platform_dependent` cond takes on `platform`, else None."""
    plats = eqn.params.get("branches_platforms") if eqn.primitive.name == "cond" else None
    if not plats or platform is None:
        return None
    aliases = {platform, "cuda" if platform == "gpu" else platform}
    default = None
    for branch, names in zip(eqn.params["branches"], plats):
        if names is None:
            default = branch
        elif aliases & set(names):
            return branch.jaxpr
    return default.jaxpr if default is not None else None


# ---- StableHLO -----------------------------------------------------------------------------
def stablehlo_kind(op_name: str, call_target: str | None = None) -> str:
    """'stablehlo.sort' -> 'sort'; a custom call -> 'custom_call:<target>' (Triton kernels:
    'custom_call:triton'); elementwise math -> ELEMENTWISE; shape-only ops -> SHAPE."""
    dialect, _, name = op_name.partition(".")
    if not name:
        name = dialect
    if name == "custom_call":
        target = call_target or "?"
        if "triton" in target:
            target = "triton"
        key = f"custom_call:{target}"
        return SHAPE if key in _SHAPE_OPS else key
    if dialect == "chlo" and name == "top_k":
        return "top_k"
    if name in _SHAPE_OPS:
        return SHAPE
    if name in _KERNEL_OPS:
        return name
    return ELEMENTWISE


def stablehlo_counts(module) -> dict[str, collections.Counter]:
    """Ops by `stablehlo_kind` per scope, from an MLIR module (`Lowered.compiler_ir("stablehlo")`).
    A `func.call` counts its callee's ops at each call site (jax lowers a function traced once
    and used twice, e.g. the same-shaped layer, as one private function called twice)."""
    table = _table()
    for scope, _, kind in stablehlo_ops(module):
        table[scope][kind] += 1
    return dict(table)


def walk_stablehlo(module, descend):
    """Every op of the program's @main as (scope, op, mult): a called function's ops at each call
    site (in the caller's scope), calls and returns themselves not listed. After an op, the walk
    enters the regions descend(op, scope) returns, as [(region, factor)]: their ops run factor
    times as often as the op (a while body's trip count; 1 elsewhere)."""
    funcs = {_attr_str(op, "sym_name"): op for op in module.body.operations if op.operation.name == "func.func"}

    def walk_ops(ops, outer, mult, depth):
        for op in ops:
            name = op.operation.name
            scope = scope_of(_location_text(op), outer)
            inner = scope if scope != STEP else outer
            if name in ("func.call", "call"):
                callee = funcs.get(_attr_str(op, "callee").lstrip("@"))
                if callee is not None and depth < 64:
                    yield from walk_func(callee, inner, mult, depth + 1)
                continue
            if name == "func.return":
                continue
            yield scope, op, mult
            for region, factor in descend(op, scope):
                for block in region.blocks:
                    yield from walk_ops(block.operations, inner, mult * factor, depth)

    def walk_func(func, outer, mult, depth):
        for region in func.operation.regions:
            for block in region.blocks:
                yield from walk_ops(block.operations, outer, mult, depth)

    main = funcs.get("main")
    if main is None:
        raise ValueError("the module has no @main function")
    yield from walk_func(main, None, 1, 0)


def _taken_regions(op) -> list:
    """An op's regions, a `case` with a constant index (a branch chosen at lowering) its taken one."""
    regions = list(op.operation.regions)
    if op.operation.name == "stablehlo.case":
        taken = _constant_index(op)
        if taken is not None and taken < len(regions):
            return [regions[taken]]
    return regions


def stablehlo_ops(module):
    """Every op the program runs, as (scope, op, `stablehlo_kind`): a called function's ops at
    each call site (in the caller's scope), a `case` with a constant index as its taken branch
    only (kind SHAPE for the case itself). Calls and returns themselves are not listed."""
    for scope, op, _ in walk_stablehlo(module, lambda op, scope: [(r, 1) for r in _taken_regions(op)]):
        name = op.operation.name
        target = _attr_str(op, "call_target_name") if name.endswith("custom_call") else None
        kind = stablehlo_kind(name, target)
        if name == "stablehlo.case" and len(_taken_regions(op)) == 1:  # no conditional
            kind = SHAPE
        yield scope, op, kind


def parse_stablehlo(text: str):
    """An MLIR module from StableHLO text (e.g. `jax.export.Exported.mlir_module()`)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    with mlir.make_ir_context():
        return ir.Module.parse(text)


def _attr_str(op, name: str) -> str:
    attrs = op.operation.attributes
    if name not in attrs:
        return ""
    a = attrs[name]
    value = getattr(a, "value", None)
    if isinstance(value, str):
        return value
    text = str(a)
    return text.strip('"').lstrip("@")


def _constant_index(op):
    """A case op's branch index when its operand is a stablehlo.constant, else None."""
    try:
        owner = op.operation.operands[0].owner
        if owner.name != "stablehlo.constant":
            return None
        m = re.search(r"dense<(-?\d+)>", str(owner.attributes["value"]))
        return int(m.group(1)) if m else None
    except Exception:  # noqa: BLE001  (a block argument, or an unexpected attribute form)
        return None


def _location_text(op) -> str:
    """The op's location as text: the name stack of a NameLoc ("jit(f)/layer3/mul"...)."""
    try:
        return str(op.location)
    except Exception:  # noqa: BLE001  (an op without a printable location)
        return ""


# ---- compiled HLO ---------------------------------------------------------------------------
_FREE_OPCODES = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
                 "replica-id", "opt-barrier", "add-dependency", "copy-done", "all-gather-done",
                 "all-reduce-done", "collective-permute-done", "async-done", "send-done", "recv-done",
                 "domain", "get-dimension-size"}
_CONTROL_OPCODES = {"while", "conditional", "call", "async-start", "async-update"}
_TRIP_RE = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')
_FUSION_KIND_RE = re.compile(r"\bkind=(k\w+)")
_TARGET_RE = re.compile(r'custom_call_target="([^"]+)"')


def compiled_kind(instr) -> str:
    """An HLO instruction's launch kind: 'fusion:<kLoop|kInput|kCustom|...>', 'custom-call:<target>'
    (Triton kernels: 'custom-call:triton'), else its opcode."""
    if instr.opcode == "fusion":
        m = _FUSION_KIND_RE.search(instr.attrs)
        return f"fusion:{m.group(1) if m else '?'}"
    if instr.opcode == "custom-call":
        m = _TARGET_RE.search(instr.attrs)
        target = m.group(1) if m else "?"
        return "custom-call:triton" if "triton" in target else f"custom-call:{target}"
    return instr.opcode


def compiled_launches(hlo_text: str) -> tuple[list[tuple[str, int, str, str, str]], list[str]]:
    """Every launch of a compiled module (post-optimisation HLO text, `Compiled.as_text()`):
    the entry computation and the loop / branch bodies it runs, bookkeeping left out.
    -> ([(scope, times per step, kind, instruction name, op_name)], notes): `times` is the
    product of the enclosing while loops' known trip counts; notes name loops without one
    (counted once) and conditionals (every branch counted)."""
    from atom_jax.trace.hlo import parse_hlo_module

    comps = parse_hlo_module(hlo_text)
    entry = next((c for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    launches, notes = [], []

    def walk(comp, mult, outer, depth):
        for ins in comp.instructions:
            scope = scope_of(ins.op_name or "", outer)
            inner = scope if scope != STEP else outer
            if ins.opcode == "while":
                m = _TRIP_RE.search(ins.attrs)
                trips = int(m.group(1)) if m else 1
                if not m:
                    notes.append(f"while {ins.name} ({scope}): trip count unknown, its body counted once")
                for called in ins.called:
                    if called in comps and depth < 64:
                        walk(comps[called], mult * trips, inner, depth + 1)
                continue
            if ins.opcode in _CONTROL_OPCODES:
                if ins.opcode == "conditional":
                    notes.append(f"conditional {ins.name} ({scope}): every branch counted")
                for called in ins.called:
                    if called in comps and depth < 64:
                        walk(comps[called], mult, inner, depth + 1)
                continue
            if ins.opcode in _FREE_OPCODES:
                continue
            launches.append((scope, mult, compiled_kind(ins), ins.name, ins.op_name or ""))

    walk(entry, 1, None, 0)
    return launches, notes


def compiled_counts_of(launches) -> dict[str, collections.Counter]:
    """Launches per scope by `compiled_kind`, from `compiled_launches`."""
    table = _table()
    for scope, mult, kind, _, _ in launches:
        table[scope][kind] += mult
    return dict(table)


# ---- tables -------------------------------------------------------------------------------
def layer_order(table) -> list[str]:
    """Scopes in order: layer0, layer1, ..., then STEP."""
    layers = sorted((s for s in table if s != STEP), key=lambda s: int(s[len("layer"):]))
    return layers + ([STEP] if STEP in table else [])


def total(counter: collections.Counter, skip=(SHAPE,)) -> int:
    return sum(v for k, v in counter.items() if k not in skip)


def format_table(table, title: str, skip=(SHAPE,), min_count: int = 1) -> str:
    """Rows: kinds (most frequent first); columns: scopes, then the total over scopes."""
    scopes = layer_order(table)
    kinds = collections.Counter()
    for s in scopes:
        kinds.update({k: v for k, v in table[s].items() if k not in skip})
    rows = [k for k, v in kinds.most_common() if v >= min_count]
    width = max([len(title)] + [len(k) for k in rows] + [5])
    head = f"{title:<{width}} " + " ".join(f"{s:>8}" for s in scopes) + f" {'all':>8}"
    lines = [head, "-" * len(head)]
    for k in rows:
        lines.append(f"{k:<{width}} " + " ".join(f"{table[s].get(k, 0):>8}" for s in scopes) + f" {kinds[k]:>8}")
    lines.append(f"{'total':<{width}} " + " ".join(f"{total(table[s], skip):>8}" for s in scopes)
                 + f" {sum(kinds.values()):>8}")
    return "\n".join(lines)


def to_json(table) -> dict:
    return {s: dict(sorted(table[s].items())) for s in layer_order(table)}


def dumps(tables: dict) -> str:
    return json.dumps({name: to_json(t) for name, t in tables.items()}, indent=1)
