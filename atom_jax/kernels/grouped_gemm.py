"""The grouped-GEMM seam for routed experts.

rows [M, K] are sorted by group; group g owns `group_sizes[g]` consecutive rows; weights
[G, K, N]. Rows past sum(group_sizes) must come out as zeros. `mean_group` (the average rows per
group implied by the routing shape) lets capacity-based backends size themselves statically. Backends register by name;
`jax.lax.ragged_dot` is the portable default (fine on CPU; on GPU it lowers to a dense masked
product, see DESIGN.md section 4, so GPU backends plug in here).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GroupedGemm = Callable[..., jax.Array]  # (rows, weights, group_sizes, mean_group=None)

_BACKENDS: dict[str, GroupedGemm] = {}


def register(name: str):
    def deco(fn: GroupedGemm) -> GroupedGemm:
        _BACKENDS[name] = fn
        return fn

    return deco


@register("ragged_dot")
def ragged_dot(rows, weights, group_sizes, mean_group=None):
    out = jax.lax.ragged_dot(rows, weights, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    # ragged_dot leaves rows past the last group unspecified on some backends: zero them.
    valid = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, 0.0).astype(rows.dtype)


@register("dense")
def dense_gather(rows, weights, group_sizes, mean_group=None):
    """Reference backend: each row picks its group's weight (memory M*K*N; tests only)."""
    ends = jnp.cumsum(group_sizes)
    gid = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")
    valid = gid < weights.shape[0]
    w = weights[jnp.minimum(gid, weights.shape[0] - 1)]
    out = jnp.einsum("mk,mkn->mn", rows.astype(jnp.float32), w.astype(jnp.float32))
    return jnp.where(valid[:, None], out, 0.0).astype(rows.dtype)


CAPACITY_FACTOR = 2.0


@register("capacity")
def capacity_padded(rows, weights, group_sizes, mean_group=None):
    """Batched [G, C, K] x [G, K, N] with a static capacity C per group.

    C = CAPACITY_FACTOR x the mean group size (`mean_group`, from the caller's routing shape).
    Rows past a group's capacity are DROPPED (output zero): lossy unless routing is balanced.
    Fast on GPU (plain batched GEMM, no dense product over all groups); benchmarks only until
    the dropless GPU kernels of the grouped-GEMM issue land."""
    g = weights.shape[0]
    mean = mean_group if mean_group is not None else rows.shape[0] / g
    cap = max(8, int(-(-CAPACITY_FACTOR * mean // 8) * 8))
    starts = jnp.cumsum(group_sizes) - group_sizes
    slot = jnp.arange(cap)
    src = starts[:, None] + slot[None, :]  # [G, C] row index of each slot
    valid = slot[None, :] < group_sizes[:, None]
    src = jnp.where(valid, src, 0)
    packed = jnp.where(valid[..., None], rows[src], 0).astype(rows.dtype)  # [G, C, K]
    out = jnp.einsum("gck,gkn->gcn", packed, weights, preferred_element_type=jnp.float32)
    dest = jnp.where(valid, src, rows.shape[0])  # invalid slots scatter out of range (dropped)
    res = jnp.zeros((rows.shape[0], weights.shape[2]), jnp.float32)
    res = res.at[dest.reshape(-1)].set(out.reshape(-1, out.shape[-1]), mode="drop")
    return res.astype(rows.dtype)


def get(name: str) -> GroupedGemm:
    if name not in _BACKENDS:
        raise ValueError(f"unknown grouped-GEMM backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def available() -> list[str]:
    return sorted(_BACKENDS)
