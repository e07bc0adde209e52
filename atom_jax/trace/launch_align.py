"""Which HLO instruction ran each kernel of one command-buffer (CUDA graph) launch.

A launch's kernels carry the command buffer's thunk as ``hlo_op`` (no instruction of the stored
module), and a kernel's name alone does not say which instruction ran it: XLA names a kernel after
the instruction it was first compiled for and reuses it for identical fusions (layer 3's norm runs
layer 0's ``input_reduce_fusion_19``), names a Pallas kernel after the kernel (``grouped_gemm__1``,
the same in every layer), a copy's after the runtime (``memcpy32_post``) and a cuBLAS call's after
the library (``nvjet_...``, often after a ``Memset``). What does say it is the place: a command
buffer runs a stretch of a computation's schedule in order. So the kernels, in the order they ran,
are aligned to the schedule (a scored alignment, as for two sequences of letters): a kernel named
after the instruction at its place, an identical fusion or its Pallas kernel scores most, a library
kernel on a library call (cuBLAS, cub) or a memcpy on a copy a little; a kernel named after
another instruction cannot take that place; an instruction may run several kernels (the memset and
GEMM of a cuBLAS call) or none, and a kernel may be left out, each at a cost. A kernel gets the
instruction every best alignment gives it (a launch of one layer's kernels fits each layer alike:
none of them is placed), and only where some kernel is placed by its name.
"""

from __future__ import annotations

import re

import numpy as np

# The suffix XLA's name uniquer gives the second, third, ... distinct kernel of one name
# ("grouped_gemm__1"), and an instruction name's number ("input_reduce_fusion.65").
_UNIQUER_RE = re.compile(r"__\d+$")
_NUMBER_RE = re.compile(r"[._]\d+$")

# what a kernel's name says about an instruction
NAMED, UNNAMED, CONTRA = "named", "unnamed", "contra"

# alignment scores (integers: ties between alignments are exact). A kernel scores as much at an
# instruction that reuses it as at the one it is named after: either may have run it.
_MATCH_NAMED = 4
_MATCH_LIBRARY, _MATCH_UNNAMED = 1, -2  # an unnamed kernel on a library call / on a fusion or Pallas call
# a second, third ... kernel of one instruction (an unnamed one on a fusion: never, it is left out)
_EXTRA_LIBRARY, _EXTRA_NAMED, _EXTRA_UNNAMED = 1, 0, -np.inf
# a memset opens a library call's work (cuBLAS and cub clear their workspace before their kernels):
# as a further kernel it scores less, so two calls' "Memset, GEMM, Memset, GEMM" split after the GEMM
_EXTRA_MEMSET = 0
_SKIP_KERNEL, _SKIP_OP = 4, 1  # a kernel placed nowhere; an instruction inside the stretch with no kernel
_NO = -np.inf


def kernel_name_of(instruction: str) -> str:
    """The name XLA's GPU backend gives the kernel of a fused instruction: the instruction's name
    with every character outside [A-Za-z0-9_] made '_' (``input_reduce_fusion.65`` ->
    ``input_reduce_fusion_65``, ``gemm_fusion_dot.54`` -> ``gemm_fusion_dot_54``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", instruction)


def bare_kernel_name(kernel: str) -> str:
    """A kernel's name without the uniquer's ``__<n>`` (``grouped_gemm__1`` -> ``grouped_gemm``)."""
    return _UNIQUER_RE.sub("", kernel)


_MEMCPY_RE = re.compile(r"memcpy", re.IGNORECASE)
# what launches a memcpy: a copy, a loop's or a conditional's predicate read back to the host
_MOVES = frozenset({"copy", "while", "conditional", "call"})


def _runs_library_kernel(op, kernel: str) -> bool:
    """Whether an instruction launches kernels named after a library or the runtime, as `kernel`
    is: a copy (or a control-flow predicate) a memcpy, a library call (cuBLAS, cub, NCCL: no fusion,
    no Pallas call, no copy) anything else."""
    if op.opcode == "fusion" or op.backend_kernel:
        return False
    return (op.opcode in _MOVES) == bool(_MEMCPY_RE.search(kernel))


def _identical(a, b) -> bool:
    """Whether two instructions may be one fusion XLA compiled once (so share a kernel name)."""
    return (a.opcode == b.opcode and _NUMBER_RE.sub("", a.name) == _NUMBER_RE.sub("", b.name)
            and a.shape == b.shape and a.fused_opcodes == b.fused_opcodes)


class KernelFit:
    """`fit(kernel, op)` for one module's ops, with the score rows of `align` cached per kernel name."""

    def __init__(self, ops: dict, by_kernel_name: dict, orders: tuple[tuple[str, ...], ...]):
        self.ops, self.by_name, self.orders = ops, by_kernel_name, orders
        self.pallas = {kernel_name_of(o.backend_kernel) for o in ops.values() if o.backend_kernel}
        self.launching = {n for order in orders for n in order}
        self._rows: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def fit(self, kernel: str, op) -> str:
        """NAMED: `op`'s own kernel, a Pallas call's kernel name (with or without the uniquer's
        ``__<n>``), the kernel of an identical fusion (same opcode, name stem, result shape and fused
        opcodes: XLA compiles one kernel for them all), or of an instruction fused into `op` (a sort
        fusion's kernel ``sort_2_1`` is its ``sort.2.1``'s); UNNAMED: the name says nothing (no
        instruction's or Pallas kernel's: ``memcpy32_post``, a library kernel); CONTRA: another
        launching instruction's kernel, or another Pallas kernel."""
        if kernel == kernel_name_of(op.name):
            return NAMED
        bare = bare_kernel_name(kernel)
        if op.backend_kernel:
            return NAMED if bare == kernel_name_of(op.backend_kernel) else CONTRA
        if bare in self.pallas:
            return CONTRA
        named = self.by_name.get(kernel, [])
        if any(o.name in self.launching and _identical(o, op) for o in named):
            return NAMED
        if any(o.name in self.launching for o in named):
            return CONTRA
        if any(o.opcode in op.fused_opcodes and o.op_name in op.fused_op_names for o in named):
            return NAMED
        return UNNAMED

    def rows(self, kernel: str, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over schedule `seq`: the score of `kernel` as an instruction's first kernel, as a further
        kernel of it, and whether its name placed it there."""
        key = (kernel, seq)
        if key not in self._rows:
            first, extra, named = [], [], []
            for name in self.orders[seq]:
                op = self.ops[name]
                f = self.fit(kernel, op)
                library = _runs_library_kernel(op, kernel)
                if f == CONTRA:
                    first.append(_NO), extra.append(_NO)
                elif f == NAMED:
                    first.append(_MATCH_NAMED), extra.append(_EXTRA_NAMED)
                else:
                    first.append(_MATCH_LIBRARY if library else _MATCH_UNNAMED)
                    extra.append(_EXTRA_UNNAMED if not library else
                                 _EXTRA_MEMSET if kernel.startswith("Memset") else _EXTRA_LIBRARY)
                named.append(f == NAMED)
            self._rows[key] = np.array(first, float), np.array(extra, float), np.array(named, bool)
        return self._rows[key]


def _excl_prefix_max(a: np.ndarray) -> np.ndarray:
    """out[i] = max(a[:i]) (-inf for i = 0)."""
    out = np.full_like(a, _NO)
    if len(a) > 1:
        out[1:] = np.maximum.accumulate(a[:-1])
    return out


def _excl_suffix_max(a: np.ndarray) -> np.ndarray:
    """out[i] = max(a[i+1:]) (-inf for the last)."""
    return _excl_prefix_max(a[::-1])[::-1]


def _align_one(first: np.ndarray, extra: np.ndarray) -> tuple[float, list[set]]:
    """Best score of aligning n kernels (rows) to one schedule (columns), and per kernel the places
    (column, or None: left out) some best alignment gives it. Forward: G[k][i], the best score of
    kernels 0..k with the last placed one at column i; backward: H[k][i], the best score of the
    kernels after k given that; kernel k is at i in a best alignment iff A[k][i] + H[k][i] is best."""
    n, m = first.shape
    pos = np.arange(m, dtype=float)
    A, G = np.empty((n, m)), np.empty((n, m))
    prev = np.full(m, _NO)
    for k in range(n):
        before = -_SKIP_KERNEL * k  # no kernel placed yet
        jump = _excl_prefix_max(prev + _SKIP_OP * pos) - _SKIP_OP * (pos - 1)
        A[k] = np.maximum(prev + extra[k], np.maximum(jump, before) + first[k])
        G[k] = np.maximum(prev - _SKIP_KERNEL, A[k])
        prev = G[k]
    best = max(prev.max(), -_SKIP_KERNEL * n)
    H = np.zeros((n, m))
    none_after = np.zeros(n)  # best score of the kernels after k with none placed up to k
    for k in range(n - 2, -1, -1):
        nxt = first[k + 1] + H[k + 1]
        jump = _excl_suffix_max(nxt - _SKIP_OP * pos) + _SKIP_OP * (pos + 1)
        H[k] = np.maximum(np.maximum(H[k + 1] - _SKIP_KERNEL, H[k + 1] + extra[k + 1]), jump)
        none_after[k] = max(none_after[k + 1] - _SKIP_KERNEL, nxt.max())
    places = []
    for k in range(n):
        at = set(np.flatnonzero(A[k] + H[k] == best).tolist())
        left_out = -_SKIP_KERNEL * (k + 1) + none_after[k] == best
        if k > 0:
            left_out |= bool(np.any(G[k - 1] - _SKIP_KERNEL + H[k] == best))
        places.append(at | ({None} if left_out else set()))
    return best, places


def align(kernels: list[str], fit: KernelFit) -> list[tuple[int, int] | None] | None:
    """Per kernel (in the order they ran), the (schedule, place) every best alignment over the
    module's schedules gives it, else None (its place is ambiguous, or it fits none); None for the
    whole launch where no kernel is placed by its name (the launch fits no schedule)."""
    if not kernels or not fit.orders:
        return None
    best, places = _NO, [set() for _ in kernels]
    for seq, order in enumerate(fit.orders):
        rows = [fit.rows(k, seq) for k in kernels]
        score, here = _align_one(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        if score > best:
            best, places = score, [set() for _ in kernels]
        if score == best:
            for k, p in enumerate(here):
                places[k] |= {None if i is None else (seq, i) for i in p}
    # named somewhere in a best alignment: the launch fits (its ambiguous kernels are not guessed)
    if not any(p is not None and fit.rows(k, p[0])[2][p[1]] for k, ps in zip(kernels, places) for p in ps):
        return None
    return [next(iter(p)) if len(p) == 1 else None for p in places]
