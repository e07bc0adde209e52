"""The grouped-GEMM seam for routed experts.

rows [M, K] are sorted by group; group g owns `group_sizes[g]` consecutive rows; weights
[G, K, N]. Rows past sum(group_sizes) must come out as zeros. Backends register by name;
`jax.lax.ragged_dot` is the portable default (fine on CPU; on GPU it lowers to a dense masked
product, see DESIGN.md section 4, so GPU backends plug in here).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GroupedGemm = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_BACKENDS: dict[str, GroupedGemm] = {}


def register(name: str):
    def deco(fn: GroupedGemm) -> GroupedGemm:
        _BACKENDS[name] = fn
        return fn

    return deco


@register("ragged_dot")
def ragged_dot(rows, weights, group_sizes):
    out = jax.lax.ragged_dot(rows, weights, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    # ragged_dot leaves rows past the last group unspecified on some backends: zero them.
    valid = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, 0.0).astype(rows.dtype)


@register("dense")
def dense_gather(rows, weights, group_sizes):
    """Reference backend: each row picks its group's weight (memory M*K*N; tests only)."""
    ends = jnp.cumsum(group_sizes)
    gid = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")
    valid = gid < weights.shape[0]
    w = weights[jnp.minimum(gid, weights.shape[0] - 1)]
    out = jnp.einsum("mk,mkn->mn", rows.astype(jnp.float32), w.astype(jnp.float32))
    return jnp.where(valid[:, None], out, 0.0).astype(rows.dtype)


def get(name: str) -> GroupedGemm:
    if name not in _BACKENDS:
        raise ValueError(f"unknown grouped-GEMM backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def available() -> list[str]:
    return sorted(_BACKENDS)
