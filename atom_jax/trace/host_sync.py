"""What in a traced program makes the host wait for the device while the program is launched.

XLA's GPU runtime launches a program's kernels from the calling thread, in order. Three kinds
of op stop it there until the device has caught up:
- a `while` loop whose trip count XLA does not know: each iteration copies the predicate to the
  host and waits for it (a `lax.fori_loop` with Python-int bounds or a `lax.scan` is a loop of
  known trip count and is not listed; a jaxpr `while` is listed even when XLA might still work
  its trip count out: it is the form that can block);
- a conditional (`lax.cond` / `lax.switch` on a traced index): the branch index is copied to
  the host and waited for (a `platform_dependent` choice is resolved at lowering: not listed);
- a host callback (`pure_callback`, `io_callback`, `jax.debug.print`...): the device waits for
  the host and the host for the device.
Then the call of the compiled step returns only when the device reaches the op, and an overlap
schedule cannot prepare the next step meanwhile (issue 27).

`host_sync_ops(closed_jaxpr)` lists them outside kernel bodies (a Pallas kernel's own loops and
branches run on the device), each with its layer scope and source line. Lower layers only: jax."""

from __future__ import annotations

import dataclasses

from atom_jax.trace.op_counts import _KERNEL_PRIMITIVES, STEP, _platform_branch, scope_of


@dataclasses.dataclass(frozen=True)
class HostSync:
    kind: str  # "while", "cond" or the callback primitive's name
    detail: str  # branches of a cond; "" otherwise
    scope: str  # "layer<i>" or the step (op_counts.STEP)
    where: str  # the innermost atom_jax source lines of the op ("" when none)


def _is_callback(name: str) -> bool:
    return "callback" in name


def _where(eqn, frames: int = 3) -> str:
    tb = eqn.source_info.traceback
    if tb is None:
        return ""
    ours = [f for f in tb.frames if "atom_jax" in f.file_name]
    return "; ".join(f"{f.file_name.rsplit('atom_jax/', 1)[-1]}:{f.line_num}" for f in ours[:frames])


def host_sync_ops(closed_jaxpr, platform: str | None = None) -> list[HostSync]:
    """Every op of the program (nested jaxprs walked, kernel bodies not) that makes XLA's GPU
    launch wait for the device; `platform`: the branch of a `platform_dependent` choice to walk
    (every branch when None)."""
    import jax

    found = []

    def walk(jaxpr, outer):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            scope = scope_of(str(eqn.source_info.name_stack), outer)
            inner = scope if scope != STEP else outer
            if name in _KERNEL_PRIMITIVES:
                continue
            chosen = _platform_branch(eqn, platform)
            if chosen is not None:
                walk(chosen, inner)
                continue
            if name == "while" or _is_callback(name) or (name == "cond" and not eqn.params.get("branches_platforms")):
                detail = f"{len(eqn.params['branches'])} branches" if name == "cond" else ""
                found.append(HostSync(name, detail, scope, _where(eqn)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, inner)

    walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), None)
    return found


def format_host_syncs(ops: list[HostSync]) -> str:
    if not ops:
        return "host syncs: none (no data-dependent while loop, conditional or host callback outside kernels)"
    lines = [f"host syncs: {len(ops)} (kind, scope, source)"]
    lines += [f"  {o.kind}{f' ({o.detail})' if o.detail else '':<16} {o.scope:<8} {o.where}" for o in ops]
    return "\n".join(lines)
