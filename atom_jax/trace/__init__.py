"""Tracing and inspection tools (``python -m atom_jax.trace <subcommand>``).

``hlo``: does XLA's schedule overlap each MoE collective with GEMMs? See :mod:`.hlo`.
"""

from atom_jax.trace.hlo import (
    MOE_KINDS,
    CollectiveOverlap,
    OverlapReport,
    analyze_hlo,
    compiled_text,
)

__all__ = ["MOE_KINDS", "CollectiveOverlap", "OverlapReport", "analyze_hlo", "compiled_text"]
