"""Dropless grouped GEMM in Pallas for the Triton backend (NVIDIA and ROCm).

rows [M, K] are sorted by group; group g owns rows [starts[g], ends[g]) (disjoint, increasing);
weights [G, K, N]. The work list holds, for each non-empty group, the row tiles that start at
the group's first row, so empty groups cost nothing and a tile never mixes two groups (its rows
past the group's end are masked). Each program writes only its own group's rows (masked store):
no two programs write the same element, so no atomics and no zero-fill pass. Rows outside every
range are left unwritten, except [zero_from, M) when given: `grouped_gemm` zeroes the rows past
the last group that way, as one more work-list range whose tiles store zeros without a K loop,
instead of a read-and-write pass over the output. bf16 in, float32 accumulate.

With `row_ids` [M] the A tile's rows are gathered: row r of the product reads x[row_ids[r]]
(x [R, K], any R), through the pointers of one masked Triton load per K step, so the MoE never
writes the [M, K] gathered rows (x[token] for every (token, choice)) to HBM; rows outside every
range (the zero range included) load nothing. With `epilogue` (fn, other [M, N]) each stored
tile is fn(other's tile as float32, the float32 product), elementwise (the MoE's SwiGLU of the
w1 product and the w3 product, so neither the w3 product nor h is a separate XLA pass).
`grouped_gemm_pair` multiplies each A tile by two weight stacks (the w1 and w3 experts) in one
kernel and stores combine(first product, second product): the gate product never goes to HBM.

On GPU the kernel reads and writes `rows` and the output in place: masked loads and stores
never touch rows past M, so neither is padded or sliced (at 4K tokens/rank those copies were
~0.2 of 1.24 ms, docs/benchmarks.md round 5). Interpret mode (CPU) clamps out-of-range slices
instead of masking, so there both are padded by one row tile.

With `transpose_b` the weights are stored [G, N, K] (each output column's K values contiguous:
what `fp4_dequant.dequantize_k_major` makes of K-major FP4 codes) and each K step multiplies the
[block_n, block_k] tile transposed (`dot(..., trans_b=True)`: on Hopper the MMA takes a K-major B
operand from shared memory as it is, no transpose in registers).
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
    # "Swap AB" (the W4A16 kernel only): each K step computes the transposed product
    # W^T [block_n, K] . X^T [K, block_m], so the decoded weight tile is the MMA's A operand and
    # the few rows of a decode work item its small N side (8 or 16, no padding to 64).
    swap_ab: bool = False
    # "GEMV" (the W4A16 kernel only): no MMA; each K step multiplies the decoded weight tile by
    # each of the work item's block_m rows elementwise and sums over K (CUDA-core FMAs, float32),
    # so the decoded tile never goes through shared memory into an MMA operand layout.
    gemv: bool = False
    # Half tail (the bf16 kernel): a work item with at most block_m / 2 rows left in its group
    # (a group's last tile) runs a block_m / 2-row product instead (one branch per program, each
    # with its own K loop), so a 192-row group computes 128 + 64 rows, not 2 x 128 (dp=1 prefill:
    # an 8K-token chunk x top-6 over 256 experts is ~192 rows an expert).
    half_tail: bool = False


# Chosen from the tile sweeps of `python -m atom_jax.bench gemm` on H100 (docs/benchmarks.md,
# 'Grouped GEMM'): 16-row tiles when groups hold a few rows each (decode: weight streaming,
# 86-90% of copy bandwidth), 128x256 for prefill. Launch order: the column tiles of one work
# item run back to back (its row tile stays in L2); grouping a group's row tiles per column
# tile, or half-height tail tiles, gained nothing in the second sweep.
DECODE_TILES = TileConfig(block_m=16, block_n=256, block_k=128, num_warps=4, num_stages=3)
PREFILL_TILES = TileConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4)


# Mid-sized groups (dp=1 prefill: an 8K-token chunk x top-6 over 256 experts is ~192 rows per
# expert, where a 128-row tile computes 256 rows for a 129-256-row group): MID_TILES from
# DECODE_MAX_ROWS_PER_GROUP up to MID_MAX_ROWS_PER_GROUP rows per expert. Measured on an H200
# (`python -m atom_jax.bench gemm --prefill-tiles`, 2026-12-01 session 10, docs/benchmarks.md):
# PREFILL_TILES were the best of 12 candidates at 192 rows per expert too (64-row tiles 10-30%
# slower), so MID_TILES is PREFILL_TILES on NVIDIA; the tier is there for a platform (ROCm) whose
# sweep says otherwise. Half tails (session 17, two sweeps on an H200): the up case 8% faster, the
# down case 13-16% slower, and the 128K prefill of `bench long-context` unchanged within its noise
# (134.3K tok/s with them on the up calls, 135.7K on all mid calls, 135.4K without), so not here.
MID_TILES = PREFILL_TILES
MID_MAX_ROWS_PER_GROUP = 256
# Half tails for the mid tier's *gathered* calls (row ids: the MoE's gate and up GEMMs) only. Their
# loss on plain calls (the down GEMM, above) does not apply to them, and under grouped_gemm.auto the
# mid tier's plain bf16 calls run on the Mosaic kernel anyway. Measured on an H200 (session 23,
# docs/benchmarks.md): the 128K prefill of `bench long-context` at 8K chunks, 920-925 ms of device
# time a prompt with them against 932-942 ms without (two prompts each, same machine; the run with
# them second, on the hotter card); in a traced 8K chunk the gate and up calls took 1.63 / 1.71 ms
# (session 20's trace without them: 1.79 / 1.94).
MID_HALF_TAIL_GATHERED = True

DECODE_MAX_ROWS_PER_GROUP = 32  # decode tiles below this many rows per expert (the W4A16 kernel's too)


def default_tiles(rows_per_group: float, gathered: bool = False) -> TileConfig:
    """DECODE_TILES below DECODE_MAX_ROWS_PER_GROUP rows per expert, MID_TILES below
    MID_MAX_ROWS_PER_GROUP (with half tails for a `gathered` call: its rows given by row ids,
    where MID_HALF_TAIL_GATHERED), PREFILL_TILES from there."""
    if rows_per_group < DECODE_MAX_ROWS_PER_GROUP:
        return DECODE_TILES
    if rows_per_group >= MID_MAX_ROWS_PER_GROUP:
        return PREFILL_TILES
    return dataclasses.replace(MID_TILES, half_tail=True) if gathered and MID_HALF_TAIL_GATHERED else MID_TILES


COMPARE_ALL_MAX = 1 << 22  # a.size * v.size up to which searchsorted_right compares all pairs


def searchsorted_right(a, v):
    """jnp.searchsorted(a, v, side="right") without a loop. jnp's default method is a while
    loop of log2(len(a) + 1) steps; on a GPU each step is a few tiny kernels, and the work lists
    of the grouped GEMMs and the indexer made them over a thousand of a 43-layer decode step's
    ~4,600 kernels (H200 trace, docs/benchmarks.md). Small: one fused compare-and-count; large:
    a sort."""
    method = "compare_all" if a.size * v.size <= COMPARE_ALL_MAX else "sort"
    return jnp.searchsorted(a, v, side="right", method=method)


def work_items(starts, ends, block_m: int, max_items: int):
    """(group, row tile) pairs in group order, padded to `max_items`. Row tiles start at their
    group's first row (not on a global grid), so a group of s rows takes ceil(s / block_m)
    tiles and no tile holds two groups' rows.

    Returns item_group [W], item_tile [W] (tile index within the group), num_items [1]."""
    g = starts.shape[0]
    count = (jnp.maximum(ends - starts, 0) + block_m - 1) // block_m
    cum = jnp.cumsum(count)
    item = jnp.arange(max_items, dtype=jnp.int32)
    group = jnp.minimum(searchsorted_right(cum, item), g - 1).astype(jnp.int32)
    tile = item - (cum[group] - count[group])
    return group, tile.astype(jnp.int32), cum[-1].reshape(1).astype(jnp.int32)


def work_item(group_ref, tile_ref, count_ref, starts_ref, ends_ref, o_ref, cfg: TileConfig, num_groups: int,
              accumulate, e_ref=None, epilogue=None):
    """The frame the dropless kernels share: program (j, i) is column tile j of work item i (a
    row tile of one range); `accumulate(g, rows, cols, mine)` returns its float32 [rows.size,
    block_n] product for a real group (rows.size: block_m, or block_m / 2 for a half tail,
    `TileConfig.half_tail`), stored as epilogue(e_ref's tile as float32, product) when
    `epilogue` is given; range num_groups is the zero range."""
    j = pl.program_id(0)  # column tile: fastest, so one work item's column tiles run together
    i = pl.program_id(1)

    @pl.when(i < count_ref[0])
    def _():
        g = group_ref[i]
        row0 = starts_ref[g] + tile_ref[i] * cfg.block_m
        cols = pl.ds(j * cfg.block_n, cfg.block_n)

        def tile(bm: int):  # the item's rows as a bm-row tile (accumulate's product is [bm, block_n])
            rows = pl.ds(row0, bm)
            mine = (row0 + jnp.arange(bm, dtype=jnp.int32) < ends_ref[g])[:, None]
            out = o_ref.at[rows, cols]

            @pl.when(g < num_groups)
            def _matmul():
                acc = accumulate(g, rows, cols, mine)
                if epilogue is not None:
                    acc = epilogue(plt.load(e_ref.at[rows, cols], mask=mine, other=0.0).astype(jnp.float32), acc)
                plt.store(out, acc.astype(o_ref.dtype), mask=mine)

            # Range num_groups is the zero range: stored without a K loop (under DP with experts
            # sharded, most rows are choices of other ranks' experts and land here).
            @pl.when(g == num_groups)
            def _zeros():
                plt.store(out, jnp.zeros((bm, cfg.block_n), o_ref.dtype), mask=mine)

        if not cfg.half_tail:
            tile(cfg.block_m)
            return
        half = ends_ref[g] - row0 <= cfg.block_m // 2
        pl.when(half)(lambda: tile(cfg.block_m // 2))
        pl.when(jnp.logical_not(half))(lambda: tile(cfg.block_m))


def a_tiles(x_ref, ids_ref, rows, mine):
    """load(ks) -> the [block_m, K slice ks] A tile of a work item's rows `rows` (masked by
    `mine`): x's rows in place, or with `ids_ref` (the row ids) x[ids[rows]], a gather load whose
    row ids are read once per work item."""
    if ids_ref is None:
        return lambda ks: plt.load(x_ref.at[rows, ks], mask=mine, other=0.0)
    ids = plt.load(ids_ref.at[rows], mask=mine[:, 0], other=0)[:, None]

    def load(ks):  # both indices as arrays: interpret mode cannot mix an array index and a slice
        cols = (ks.start + jnp.arange(ks.size, dtype=jnp.int32))[None, :]
        return plt.load(x_ref.at[ids, cols], mask=mine, other=0.0)

    return load


def split_refs(refs, gather: bool, fused: bool):
    """The kernels' operands after the work list, ([ids], x, weights..., [epilogue operand],
    out) -> (ids_ref or None, epilogue operand ref or None, (x, weights..., out))."""
    ids_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    e_ref, refs = (refs[-2], refs[:-2] + refs[-1:]) if fused else (None, refs)
    return ids_ref, e_ref, refs


def _kernel(group_ref, tile_ref, count_ref, starts_ref, ends_ref, *refs, cfg: TileConfig, k_steps: int,
            num_groups: int, gather: bool, epilogue, transpose_b: bool = False, combine=None):
    ids_ref, e_ref, (x_ref, *w_refs, o_ref) = split_refs(refs, gather, epilogue is not None)

    def accumulate(g, rows, cols, mine):
        load = a_tiles(x_ref, ids_ref, rows, mine)

        def product(a, w_ref, ks):
            if transpose_b:  # weights [G, N, K]: the [block_n, block_k] tile, K-major
                return plt.dot(a, w_ref[g, cols, ks], trans_b=True)
            return plt.dot(a, w_ref[g, ks, cols])

        def step(kk, accs):  # one A tile load per K step for every weight stack
            ks = pl.ds(pl.multiple_of(kk * cfg.block_k, cfg.block_k), cfg.block_k)
            a = load(ks)
            return tuple(acc + product(a, w_ref, ks) for acc, w_ref in zip(accs, w_refs))

        zero = jnp.zeros((mine.shape[0], cfg.block_n), jnp.float32)  # block_m rows, or half of them
        accs = jax.lax.fori_loop(0, k_steps, step, (zero,) * len(w_refs))
        if combine is None:
            return accs[0]
        # the first product rounded as the unfused first GEMM stores it (`grouped_gemm_pair`)
        return combine(accs[0].astype(o_ref.dtype).astype(jnp.float32), accs[1])

    work_item(group_ref, tile_ref, count_ref, starts_ref, ends_ref, o_ref, cfg, num_groups, accumulate,
              e_ref, epilogue)


def block_sizes(k: int, n: int, cfg: TileConfig) -> tuple[int, int]:
    """(block_k, block_n) for weights [G, K, N]: the tiles' sizes capped at K and N, which they
    must divide (ValueError otherwise)."""
    bk, bn = min(cfg.block_k, k), min(cfg.block_n, n)
    if k % bk or n % bn:
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={bk} and block_n={bn}")
    return bk, bn


def grouped_gemm_ranges(rows, weights, starts, ends, cfg: TileConfig | None = None,
                        interpret: bool = False, zero_from=None, row_ids=None, epilogue=None,
                        transpose_b: bool = False, combine=None):
    """out[r] = rows[r] @ weights[g] for r in [starts[g], ends[g]); rows [zero_from, M) are zero
    when zero_from (a scalar at or past the last range) is given; other rows unspecified.
    With row_ids [M] (int32, each in [0, R) for rows [R, K]): rows[row_ids[r]] instead of rows[r].
    With epilogue (fn, other [M, N]): out[r] = fn(other[r] as float32, the float32 product).
    With transpose_b: weights stored [G, N, K], out[r] = rows[r] @ weights[g].T.
    With combine (fn): weights is a pair (wa, wb) of one shape and out[r] = fn(rows[r] @ wa[g]
    rounded to rows.dtype, as float32; rows[r] @ wb[g], float32), both products from one A load."""
    m, k = num_rows(rows, row_ids), rows.shape[1]
    stacks = pair_stacks(weights, combine, epilogue)
    shape = stacks[0].shape
    g, k2, n = (shape[0], shape[2], shape[1]) if transpose_b else shape
    if k != k2:
        raise ValueError(f"rows have K={k}, weights K={k2}")
    cfg = cfg or PREFILL_TILES
    if cfg.swap_ab or cfg.gemv:
        raise ValueError("swap_ab and gemv are W4A16-kernel variants (w4a16_grouped_gemm); the bf16 kernel has neither")
    bk, bn = block_sizes(k, n, cfg)
    cfg = dataclasses.replace(cfg, block_k=bk, block_n=bn)
    starts, ends = with_zero_range(starts, ends, zero_from, m)
    pad = cfg.block_m if interpret else 0
    a_operands = padded_a(rows, row_ids, pad)
    fn, e_operands = epilogue_operands(epilogue, (m, n), pad)
    items = -(-m // cfg.block_m) + starts.shape[0]  # each range adds at most one partly filled tile
    group, tile, count = work_items(starts, ends, cfg.block_m, items)
    call = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, k_steps=k // bk, num_groups=g, gather=row_ids is not None,
                          epilogue=fn, transpose_b=transpose_b, combine=combine),
        out_shape=jax.ShapeDtypeStruct((m + pad, n), rows.dtype),
        grid=(n // bn, items),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_gemm",
    )
    out = call(group, tile, count, starts, ends, *a_operands, *stacks, *e_operands)
    return out[:m] if pad else out


def pair_stacks(weights, combine, epilogue) -> tuple:
    """The weight stacks a ranges call multiplies: (weights,), or with `combine` the pair (wa, wb)
    (same shape; no `epilogue` then)."""
    if combine is None:
        return (weights,)
    if epilogue is not None:
        raise ValueError("combine and epilogue are exclusive")
    wa, wb = weights
    if wa.shape != wb.shape:
        raise ValueError(f"a pair's weight stacks must have one shape, got {wa.shape} and {wb.shape}")
    return (wa, wb)


def epilogue_operands(epilogue, shape, pad: int):
    """(fn or None, (the epilogue's operand, padded by `pad` rows for interpret mode,) or ())."""
    if epilogue is None:
        return None, ()
    fn, other = epilogue
    if other.shape != shape:
        raise ValueError(f"the epilogue's operand has shape {other.shape}, the product {shape}")
    return fn, (jnp.pad(other, ((0, pad), (0, 0))) if pad else other,)


def num_rows(rows, row_ids) -> int:
    """M, the product's rows: len(row_ids) when gathering, else len(rows)."""
    return rows.shape[0] if row_ids is None else row_ids.shape[0]


def padded_a(rows, row_ids, pad: int):
    """The A operands: (rows,) or (row_ids int32, rows). Tiles start at group starts, so the
    last may run up to block_m - 1 rows past M: masked on GPU, but interpret mode clamps the
    slice, so there (pad = block_m) the array indexed by the product's row is padded: the rows,
    or the row ids (pointing at row 0) when gathering."""
    if row_ids is None:
        return (jnp.pad(rows, ((0, pad), (0, 0))) if pad else rows,)
    ids = row_ids.astype(jnp.int32)
    return (jnp.pad(ids, (0, pad)) if pad else ids, rows)


def with_zero_range(starts, ends, zero_from, m: int):
    """int32 (starts, ends), plus [zero_from, m) as one more range when zero_from is given: the
    kernels store zeros for range len(starts) (rows past the last group)."""
    starts, ends = starts.astype(jnp.int32), ends.astype(jnp.int32)
    if zero_from is None:
        return starts, ends
    return (jnp.append(starts, jnp.asarray(zero_from, jnp.int32)),
            jnp.append(ends, jnp.int32(m)))


def group_ranges(group_sizes):
    """Contiguous groups by size -> (starts, ends), int32."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def from_group_sizes(ranges_kernel, rows, weights, group_sizes, *args, row_ids=None, zero_tail=True,
                     epilogue=None, **options):
    """The seam's contract over a ranges kernel (`grouped_gemm_ranges(rows, weights, starts,
    ends, *args, zero_from=..., row_ids=..., epilogue=...)`): contiguous groups by size; rows
    past the last group are zero (unwritten with zero_tail=False)."""
    starts, ends = group_ranges(group_sizes)
    extra = {name: v for name, v in (("row_ids", row_ids), ("epilogue", epilogue)) if v is not None}
    return ranges_kernel(rows, weights, starts, ends, *args, zero_from=ends[-1] if zero_tail else None, **extra,
                         **options)


# `grouped_gemm_pair`'s tiles at every rows per expert when set (from `bench gemm --prefill-tiles`);
# None: `pair_tiles` derives them from default_tiles'.
PAIR_TILES: TileConfig | None = None


def pair_tiles(rows_per_group: float) -> TileConfig:
    """`grouped_gemm_pair`'s tiles: PAIR_TILES if set, else default_tiles' with half as many
    columns (at least 64), so its two float32 accumulators hold as many values, and its K steps
    load as many weights, as the single product's one."""
    if PAIR_TILES is not None:
        return PAIR_TILES
    cfg = default_tiles(rows_per_group)
    return dataclasses.replace(cfg, block_n=max(cfg.block_n // 2, 64))


def grouped_gemm_pair(rows, wa, wb, group_sizes, combine, cfg: TileConfig | None = None, interpret: bool = False,
                      row_ids=None, zero_tail: bool = True, transpose_b: bool = False):
    """combine(rows @ wa[g] rounded to rows.dtype, as float32; rows @ wb[g] in float32) per row
    (groups as `grouped_gemm`), in one kernel loading each A tile once for both products (the
    MoE's gate and up GEMMs, combine its SwiGLU): the values of `grouped_gemm(rows, wa, ...)`
    then `grouped_gemm(rows, wb, ..., epilogue=(combine, that))`, without the first product's
    round trip through HBM. wa and wb [G, K, N] of one shape ([G, N, K] with transpose_b)."""
    if cfg is None:
        cfg = pair_tiles(num_rows(rows, row_ids) / max(wa.shape[0], 1))
    return from_group_sizes(grouped_gemm_ranges, rows, (wa, wb), group_sizes, cfg, interpret, row_ids=row_ids,
                            zero_tail=zero_tail, transpose_b=transpose_b, combine=combine)


def grouped_gemm(rows, weights, group_sizes, cfg: TileConfig | None = None,
                 interpret: bool = False, row_ids=None, zero_tail: bool = True, epilogue=None,
                 transpose_b: bool = False):
    """The seam's contract: contiguous groups by size; rows past the last group are zero
    (unwritten with zero_tail=False). `row_ids` [M]: the product's rows are rows[row_ids]
    (gathered in the kernel). `epilogue` (fn, other [M, N]): fn(other, product) is stored.
    `transpose_b`: weights stored [G, N, K] (rows @ weights[g].T)."""
    if cfg is None:
        cfg = default_tiles(num_rows(rows, row_ids) / max(weights.shape[0], 1), gathered=row_ids is not None)
    return from_group_sizes(grouped_gemm_ranges, rows, weights, group_sizes, cfg, interpret, row_ids=row_ids,
                            zero_tail=zero_tail, epilogue=epilogue, transpose_b=transpose_b)
