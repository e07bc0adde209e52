"""Dropless grouped GEMM in Pallas for the Triton backend (NVIDIA and ROCm).

rows [M, K] are sorted by group; group g owns rows [starts[g], ends[g]) (disjoint, increasing);
weights [G, K, N]. The work list pairs each non-empty group with every row tile it touches, so
empty groups cost nothing and a tile that straddles a boundary is computed once per group
with a row mask. Each program writes only its own group's rows (masked store): no two programs
write the same element, so no atomics and no zero-fill pass. Rows outside every range are left
unwritten: `grouped_gemm_ranges` leaves them so (the dropless capacity path fills them),
`grouped_gemm` zeroes them. bf16 in, float32 accumulate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Launch order: column tiles of one work item back to back (the row tile stays in L2) or
    # work items of one column tile back to back (the weight tile stays in L2).
    n_fastest: bool = False


# Chosen from the tile sweep of scripts/bench_grouped_gemm.py on H100 (docs/benchmarks.md,
# 'Grouped GEMM'): 16-row tiles when groups hold a few rows each (decode: weight streaming,
# 86-90% of copy bandwidth), 128x256 for prefill (the best of the sweep from 1K tokens/rank);
# column tiles of one work item launched back to back won at every size.
DECODE_TILES = TileConfig(block_m=16, block_n=256, block_k=128, num_warps=4, num_stages=3, n_fastest=True)
PREFILL_TILES = TileConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4, n_fastest=True)


def default_tiles(rows_per_group: float) -> TileConfig:
    return DECODE_TILES if rows_per_group < 32 else PREFILL_TILES


def work_items(starts, ends, block_m: int, num_row_tiles: int):
    """(group, row tile) pairs that hold rows, in group order, padded to a static length.

    Returns item_group [W], item_tile [W], num_items [1] with W = num_row_tiles + G (an upper
    bound: each group adds at most one tile beyond the tiles the rows fill)."""
    g = starts.shape[0]
    size = ends - starts
    first = starts // block_m
    last = (ends - 1) // block_m
    count = jnp.where(size > 0, last - first + 1, 0)
    cum = jnp.cumsum(count)
    total = cum[-1]
    w = num_row_tiles + g
    item = jnp.arange(w, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cum, item, side="right"), g - 1).astype(jnp.int32)
    tile = first[group] + item - (cum[group] - count[group])
    return group, tile.astype(jnp.int32), total.reshape(1).astype(jnp.int32)


def _kernel(group_ref, tile_ref, count_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *,
            cfg: TileConfig, k_steps: int):
    i = pl.program_id(1 if cfg.n_fastest else 0)
    j = pl.program_id(0 if cfg.n_fastest else 1)

    @pl.when(i < count_ref[0])
    def _():
        g = group_ref[i]
        row0 = tile_ref[i] * cfg.block_m
        rows = row0 + jnp.arange(cfg.block_m, dtype=jnp.int32)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        cols = pl.ds(j * cfg.block_n, cfg.block_n)

        def step(kk, acc):
            ks = pl.ds(pl.multiple_of(kk * cfg.block_k, cfg.block_k), cfg.block_k)
            a = plt.load(x_ref.at[pl.ds(row0, cfg.block_m), ks], mask=mine[:, None], other=0.0)
            b = w_ref[g, ks, cols]
            return acc + plt.dot(a, b)

        acc = jax.lax.fori_loop(0, k_steps, step,
                                jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
        plt.store(o_ref.at[pl.ds(row0, cfg.block_m), cols], acc.astype(o_ref.dtype),
                  mask=mine[:, None])


def grouped_gemm_ranges(rows, weights, starts, ends, cfg: TileConfig | None = None,
                        interpret: bool = False):
    """out[r] = rows[r] @ weights[g] for r in [starts[g], ends[g]); other rows unspecified."""
    m, k = rows.shape
    g, k2, n = weights.shape
    if k != k2:
        raise ValueError(f"rows have K={k}, weights K={k2}")
    cfg = cfg or PREFILL_TILES
    bk = min(cfg.block_k, k)
    bn = min(cfg.block_n, n)
    if k % bk or n % bn:
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={bk} and block_n={bn}")
    cfg = dataclasses.replace(cfg, block_k=bk, block_n=bn)
    pad = (-m) % cfg.block_m
    # The row tile is read whole (masked): pad so no tile runs past the buffer.
    x = jnp.pad(rows, ((0, pad), (0, 0))) if pad else rows
    row_tiles = (m + pad) // cfg.block_m
    starts = starts.astype(jnp.int32)
    ends = ends.astype(jnp.int32)
    group, tile, count = work_items(starts, ends, cfg.block_m, row_tiles)
    call = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, k_steps=k // bk),
        out_shape=jax.ShapeDtypeStruct((m + pad, n), rows.dtype),
        grid=(n // bn, group.shape[0]) if cfg.n_fastest else (group.shape[0], n // bn),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_gemm",
    )
    out = call(group, tile, count, starts, ends, x, weights)
    return out[:m] if pad else out


def grouped_gemm(rows, weights, group_sizes, cfg: TileConfig | None = None,
                 interpret: bool = False):
    """The seam's contract: contiguous groups by size; rows past the last group are zero."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    if cfg is None:
        cfg = default_tiles(rows.shape[0] / max(weights.shape[0], 1))
    out = grouped_gemm_ranges(rows, weights, starts, ends, cfg, interpret)
    valid = jnp.arange(rows.shape[0]) < ends[-1]
    return jnp.where(valid[:, None], out, 0).astype(rows.dtype)
