"""Dropless grouped GEMM for Hopper in Pallas Mosaic GPU: TMA loads, wgmma, warp specialization.

Same contract and work list as `pallas_grouped_gemm` (row tiles that start at their group's first
row, `work_items`), built like a warp-specialized Hopper matmul: each CTA has one memory
warpgroup streaming row and weight tiles through a `stages`-deep shared-memory ring with TMA,
and two compute warpgroups, each owning a tile_m x tile_n accumulator of the CTA's
tile_m x 2*tile_n output tile. CTAs are persistent and walk the (work item, column tile) grid.

Why: TMA loads and warp specialization are what dense Hopper matmuls need. Measured
(docs/benchmarks.md, grouped GEMM round 5, H100): on the dense problem (one group) this kernel
reaches 93% of cuBLAS (Triton kernel 83%, jax's dense Mosaic matmul 97%); on routed problems it
beats the Triton kernel on V4-Flash at 8-16K tokens/rank and loses on V4-Pro at 4-8K, so it is an
opt-in backend. The Triton kernel stays the default, for ROCm and for decode.

Row tiles start at their group's first row rounded down to 8 (TMA into the tiled shared-memory
layout needs 8-row-aligned starts), so a tile may begin with up to 7 rows of the previous group
and end inside its own group. Those rows belong to other CTAs, so each epi_m-row chunk of the
accumulator is stored with a ladder of TMA copies of epi_m, epi_m/2, ..., 1 rows, one per set
bit of the chunk's own-row count.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from atom_jax.kernels.pallas_grouped_gemm import from_group_sizes, with_zero_range, work_items


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    tile_m: int = 128  # rows per work item, shared by both compute warpgroups
    tile_n: int = 128  # columns per compute warpgroup (a CTA covers 2 * tile_n)
    tile_k: int = 64
    stages: int = 3  # shared-memory ring depth of the TMA pipeline
    epi_m: int = 64  # accumulator rows stored per epilogue chunk
    # Launch order: the (item, column tile) grid is walked in bands of `band` column tiles,
    # snaking, so neighbouring CTAs share row tiles and weight tiles in L2.
    band: int = 8


# The defaults (3 stages, bands of 8): best of the H100 comparison (docs/benchmarks.md, round 4).
PREFILL_MOSAIC = MosaicTiles()
ROW_ALIGN = 8


def fits(k: int, n: int, cfg: MosaicTiles = PREFILL_MOSAIC) -> bool:
    """Whether the kernel's tiles divide weights [G, k, n] (K by tile_k, N by a CTA's 2 * tile_n)."""
    return not (k % cfg.tile_k or n % (2 * cfg.tile_n))


def _num_sms() -> int:
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or 132  # 132: H100/H200 SXM (CPU lowering tests)


def max_work_items(m: int, g: int, tile_m: int) -> int:
    """Static bound on the work list: each group adds at most one tile beyond its rows plus
    the up to 7 rows of alignment before it."""
    return -(-(m + g * (ROW_ALIGN - 1)) // tile_m) + g


def aligned_work_list(starts, ends, tile_m: int, max_items: int):
    """Work items for the Mosaic kernel: (row0, lo, hi, group) per item and the item count.

    TMA loads into the 8-row tiled shared-memory layout must start on an 8-row boundary (an
    unaligned start zero-filled half the rows on H100), so a group's tiles start at its first
    row rounded down to 8: tile rows [row0, row0 + tile_m) are loaded and rows [row0 + lo,
    row0 + hi) stored; the first tile of a group skips up to 7 rows of the previous group."""
    starts = starts.astype(jnp.int32)
    ends = ends.astype(jnp.int32)
    first = starts - starts % ROW_ALIGN
    group, tile, count = work_items(first, jnp.where(ends > starts, ends, first), tile_m, max_items)
    row0 = first[group] + tile * tile_m
    lo = jnp.maximum(starts[group] - row0, 0)
    hi = jnp.minimum(ends[group] - row0, tile_m)
    return row0, lo, hi, group, count


def grouped_gemm_ranges(rows, weights, starts, ends, cfg: MosaicTiles = PREFILL_MOSAIC,
                        zero_from=None):
    """out[r] = rows[r] @ weights[g] for r in [starts[g], ends[g]); rows [zero_from, M) are zero
    when zero_from (a scalar at or past the last range) is given; other rows unspecified."""
    m, k = rows.shape
    g, k2, n = weights.shape
    bm, bn, bk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_n = 2 * bn
    if k != k2:
        raise ValueError(f"rows have K={k}, weights K={k2}")
    if not fits(k, n, cfg) or bm % cfg.epi_m:
        raise ValueError(f"K={k} must be a multiple of {bk}, N={n} of {cta_n}, tile_m of epi_m")
    if rows.dtype != weights.dtype:
        raise ValueError(f"rows {rows.dtype} and weights {weights.dtype} must share a dtype")
    starts, ends = with_zero_range(starts, ends, zero_from, m)  # range g: stored as zeros
    items = max_work_items(m, starts.shape[0], bm)
    item_row0, item_lo, item_hi, group, count = aligned_work_list(starts, ends, bm, items)
    # TMA zero-fills the rows of the last tile that run past M, but the tiled layout needs a row
    # count that is a multiple of 8: pad only then (a pad is a copy of all of `rows`).
    x = jnp.pad(rows, ((0, (-m) % ROW_ALIGN), (0, 0))) if m % ROW_ALIGN else rows
    n_iters, k_iters = n // cta_n, k // bk
    swizzle = plgpu.find_swizzle(bk * jnp.dtype(rows.dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(rows.dtype).itemsize)),
                  plgpu.SwizzleTransform(swizzle))

    def pipeline(body, compute_context):
        spec = functools.partial(plgpu.BlockSpec, transforms=transforms, memory_space=plgpu.SMEM)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[spec((bm, bk), lambda kk: (0, kk)), spec((bk, cta_n), lambda kk: (kk, 0))],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)

    def kernel(row0_ref, lo_ref, hi_ref, group_ref, count_ref, x_ref, w_ref, o_ref):
        ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the bodies)

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(x_ref.at[:bm], w_ref.at[0, :, :cta_n]),
            out_smem=plgpu.SMEM((2, cfg.epi_m, bn), o_ref.dtype),
            collective_axes="wg")
        def _scope(allocs, out_smem):
            wg = jax.lax.axis_index("wg")
            count = count_ref[0]

            @plgpu.nd_loop((items * n_iters,), collective_axes="sm")
            def _loop(info):
                i, j = plgpu.planar_snake(info.index[0], (items, n_iters), 1, cfg.band)

                @pl.when(i < count)
                def _item():
                    row0, lo, hi, gi = row0_ref[i], lo_ref[i], hi_ref[i], group_ref[i]
                    cols = pl.ds(j * cta_n + wg * bn, bn)

                    def store(acc):
                        acc = acc.astype(o_ref.dtype)
                        for c in range(bm // cfg.epi_m):
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # slot free again
                            out_smem[wg] = acc[c * cfg.epi_m:(c + 1) * cfg.epi_m]
                            plgpu.commit_smem()
                            # this chunk stores its rows [chunk_lo, chunk_lo + n_store)
                            chunk_lo = jnp.clip(lo - c * cfg.epi_m, 0, cfg.epi_m)
                            n_store = jnp.clip(hi - c * cfg.epi_m, 0, cfg.epi_m) - chunk_lo
                            done = chunk_lo
                            size = cfg.epi_m
                            while size:
                                @pl.when((n_store & size) != 0)
                                def _(done=done, size=size):
                                    plgpu.copy_smem_to_gmem(
                                        out_smem.at[wg, pl.ds(done, size)],
                                        o_ref.at[pl.ds(row0 + c * cfg.epi_m + done, size), cols])
                                done = done + (n_store & size)
                                size //= 2

                    def compute_context(run_pipeline):
                        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                        def _(acc_ref):
                            run_pipeline(acc_ref)
                            store(acc_ref[...])

                    def mma(_, a_smem, b_smem, acc_ref):
                        plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg * bn, bn)])
                        plgpu.wgmma_wait(0)
                        return acc_ref

                    @pl.when(gi < g)
                    def _matmul():
                        pipeline(mma, compute_context)(
                            # multiple_of: the 8-row alignment; layout inference fails without it
                            x_ref.at[pl.ds(pl.multiple_of(row0, ROW_ALIGN), bm), :],
                            w_ref.at[gi].at[:, pl.ds(j * cta_n, cta_n)],
                            allocations=allocs)

                    @pl.when((gi == g) & (wg < 2))  # the zero range: compute warpgroups only
                    def _zeros():
                        store(plgpu.layout_cast(jnp.zeros((bm, bn), jnp.float32), plgpu.Layout.WGMMA))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), rows.dtype),
        grid=(_num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
        # Warpgroup semantics, as jax's Hopper matmul (lane semantics measured 0-3% slower).
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return call(item_row0, item_lo, item_hi, group, count, x, weights)


def grouped_gemm(rows, weights, group_sizes, cfg: MosaicTiles = PREFILL_MOSAIC):
    """The seam's contract: contiguous groups by size; rows past the last group are zero."""
    return from_group_sizes(grouped_gemm_ranges, rows, weights, group_sizes, cfg)
