"""Kernel categories and micro-batch attribution: every rule lives in this file.

A device event is classified from the texts we know about it: the kernel name
(``nvjet_tst_...``, ``ncclDevKernel_AllGather_RING_LL``, ``ynn_fusion.1``), the
HLO instruction it ran (``hlo_op`` stat, e.g. ``all-gather-start.3``) and, when the
trace carries the HLO module, that instruction's opcode, custom-call target and
the opcodes fused into it. The first rule in :data:`CATEGORY_RULES` that matches
wins, so the order encodes priority (an NCCL kernel named ``...ReduceScatter...``
is communication, not a reduction; a cuDNN ``..._flash_fprop_wgmma...`` kernel is
attention, not GEMM). Names are tried before HLO opcodes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

GEMM = "gemm"
ATTENTION = "attention"
COLLECTIVE = "collective"
COPY = "copy"
OTHER = "other"
CATEGORIES = (GEMM, ATTENTION, COLLECTIVE, COPY, OTHER)
# Kernels that do work the device could overlap communication with.
COMPUTE_CATEGORIES = (GEMM, ATTENTION, COPY, OTHER)

# Named scopes of the two-batch-overlap chains (jax.named_scope); they end up in
# HLO op_name metadata ("jit(step)/.../mb_a/dot_general") and so in the trace.
MICRO_BATCHES = ("mb_a", "mb_b")
UNKNOWN_MB = "unknown"
MIXED_MB = "mixed"  # a fused kernel holding ops of both micro-batches


@dataclasses.dataclass(frozen=True)
class CategoryRule:
    category: str
    # Matched (search, case-insensitive) against kernel name, hlo_op name and custom-call target.
    name_pattern: str
    # HLO opcodes of the instruction itself or of any op fused into it.
    opcodes: frozenset[str] = frozenset()
    # Copy-like fusions: match only if *every* fused op is in ``opcodes`` + bookkeeping ops.
    all_fused_ops: bool = False


CATEGORY_RULES: tuple[CategoryRule, ...] = (
    CategoryRule(
        COLLECTIVE,
        r"nccl|rccl|all[-_ ]?gather|reduce[-_ ]?scatter|all[-_ ]?reduce|all[-_ ]?to[-_ ]?all"
        r"|collective[-_ ]?permute|collective[-_ ]?broadcast",
        frozenset({
            "all-gather", "all-gather-start", "all-gather-done",
            "reduce-scatter", "all-reduce", "all-reduce-start", "all-reduce-done",
            "all-to-all", "ragged-all-to-all",
            "collective-permute", "collective-permute-start", "collective-permute-done",
            "collective-broadcast", "send", "send-done", "recv", "recv-done",
        }),
    ),
    CategoryRule(
        ATTENTION,
        # Plain "softmax" is left out on purpose: MoE router softmax is not attention.
        r"flash|attention|fmha|sdpa|mha_(fwd|bwd)",
    ),
    CategoryRule(
        GEMM,
        r"gemm|matmul|cublas|cutlass|\bdot|dot[_-]general|nvjet|sm\d+_xmma|xmma_gemm|wgmma",
        frozenset({"dot", "convolution", "ragged-dot"}),
    ),
    CategoryRule(
        COPY,
        r"memcpy|memset|\bcopy|transpose|dynamic[-_]update[-_]slice|concatenate",
        frozenset({
            "copy", "copy-start", "copy-done", "transpose", "dynamic-update-slice",
            "concatenate", "slice", "dynamic-slice", "pad", "broadcast", "reverse",
        }),
        all_fused_ops=True,
    ),
)

# Ops that move no data by themselves: ignored when deciding a fusion is copy-only.
_BOOKKEEPING_OPS = frozenset({
    "parameter", "constant", "bitcast", "reshape", "tuple", "get-tuple-element", "iota",
})

_COMPILED_RULES = tuple((r, re.compile(r.name_pattern, re.IGNORECASE)) for r in CATEGORY_RULES)


def _match_name(name: str) -> str | None:
    for rule, pattern in _COMPILED_RULES:
        if pattern.search(name):
            return rule.category
    return None


def classify(names: Iterable[str], opcode: str | None = None,
             fused_opcodes: Iterable[str] = ()) -> str:
    """Category of a kernel from its name(s) and, if known, HLO opcode(s).

    ``names`` in order of trust: kernel name, then hlo_op name / custom-call target.
    The first name any rule matches decides (a ``Memset`` launched by a cuBLAS
    custom call is a copy, whatever the call); only then are opcodes used:
    ``opcode`` is the HLO instruction's, ``fused_opcodes`` those inside it.
    """
    for name in names:
        if name and (category := _match_name(name)):
            return category
    fused = set(fused_opcodes)
    own = {opcode} if opcode else set()
    for rule in CATEGORY_RULES:
        if not rule.opcodes:
            continue
        if rule.all_fused_ops:
            # A fusion counts as a copy only if it does nothing but move data.
            if opcode in rule.opcodes:
                return rule.category
            moving = fused - _BOOKKEEPING_OPS
            if opcode == "fusion" and moving and moving <= rule.opcodes:
                return rule.category
        elif (own | fused) & rule.opcodes:
            return rule.category
    return OTHER


_MB_PATTERNS = {mb: re.compile(rf"(?<![A-Za-z0-9]){re.escape(mb)}(?![A-Za-z0-9])")
                for mb in MICRO_BATCHES}


# Named scope of decoder layer i (`trace.capture.layer_scope`, put around each layer by the layer
# loop): op_name metadata "jit(step)/.../layer12/mb_a/dot_general"; ops outside every layer
# (input unpacking, embedding, logits, sampling) count as NO_LAYER.
LAYER_SCOPE = "layer{}"
NO_LAYER = "step"
UNKNOWN_LAYER = "?"  # a kernel nothing places (no HLO op found, no scope stat): not NO_LAYER, which is a claim
_LAYER_RE = re.compile(r'(?:^|[/"(])(layer\d+)(?:/|"|$)')


def layer_of(texts: Iterable[str]) -> str:
    """``layer<i>`` of the first text that names a layer scope, else NO_LAYER."""
    for t in texts:
        m = _LAYER_RE.search(t or "")
        if m:
            return m.group(1)
    return NO_LAYER


def layers_label(layers: Iterable[str]) -> str:
    """One label for the layers a kernel name ran in (the same kernel serves every layer):
    ``layer3``, ``layer0-3`` (consecutive), ``layer0,2``, with ``+step`` / ``+?`` for NO_LAYER and
    UNKNOWN_LAYER, so a summary never names one layer for a kernel that ran in several."""
    found = set(layers)
    nums = sorted(int(x[5:]) for x in found if _LAYER_RE.fullmatch(x))
    if len(nums) == 1:
        text = f"layer{nums[0]}"
    elif nums and nums == list(range(nums[0], nums[-1] + 1)):
        text = f"layer{nums[0]}-{nums[-1]}"
    else:
        text = "layer" + ",".join(map(str, nums)) if nums else ""
    rest = [x for x in (NO_LAYER, UNKNOWN_LAYER) if x in found]
    return "+".join(([text] if text else []) + rest)


def micro_batch(texts: Iterable[str]) -> str:
    """``mb_a`` / ``mb_b`` if the texts (kernel name, op_name metadata, ...) name exactly
    one micro-batch scope, ``mixed`` if they name both, else ``unknown``."""
    found = {mb for t in texts if t for mb, pat in _MB_PATTERNS.items() if pat.search(t)}
    if len(found) == 1:
        return found.pop()
    return MIXED_MB if found else UNKNOWN_MB
