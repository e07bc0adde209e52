"""Lightning-indexer scores in Pallas (Triton backend: NVIDIA and ROCm; interpreted on CPU).

One call scores the entries [e0, e0 + block) of each token's slot: out[t, j] =
sum_h w[t, h] * relu(q[t, h] . key[e0 + j]), keys read straight from the paged pool through the
slot's page table. The caller (models/index_topk.py) picks how many entries one call scores
(a block of a loop with a running top-k, or one call over the step's longest visible prefix,
within a float32 score budget), so no [T, heads, E] tensor exists.

Programs: (entry sub-block, work item) (decode-sized calls of very many sub-blocks: fewer
programs along the entries, each looping over its sub-blocks, `score_programs`); a work item is a tile of `block_t` consecutive tokens
of ONE chunk of the packed buffer (tiles start at the chunk's first token, as the grouped GEMM's
start at a group's first row), so its tokens share one slot and one key block, loaded once for
all tokens and heads. Two ways to score it, chosen per work item in ONE place
(`IndexerTiles.heads_max`, forced by `scorer(path=...)`):
- tokens as the dots' rows (prefill tiles): a loop over the heads of `block_t x block_e` dots
  over the index head dim, accumulating w * relu in a [block_t, block_e] tile;
- the heads path (decode: a 1-token chunk would waste block_t - 1 of block_t rows, 64 times
  per key block; the heads fill the dot instead, as in FlashMLA's decode tile): a loop over the
  item's tokens, each ONE dot of the key block and all heads' queries (H padded to 16 at least),
  relu, times w[t, h], summed over the heads into the token's [block_e] row. The dot is
  [block_e, di] x [di, H] by default (`heads_as` "cols": the entries are the rows, so the sum
  over the heads is along the dot's columns, within a warp) or [H, di] x [di, block_e]
  ("rows": the sum over rows crosses warps through shared memory).
Scores at or past a token's visible count are -inf or unspecified (sub-blocks past every
visible prefix of a tile are skipped), as are rows of padding tokens: the caller masks them by
the visible count (0 for padding)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from atom_jax.kernels.pallas_grouped_gemm import work_items


@dataclasses.dataclass(frozen=True)
class IndexerTiles:
    block_t: int = 32  # tokens of one chunk per program
    block_e: int = 128  # entries per program (each head's q tile is reused over them)
    num_warps: int = 4
    num_stages: int = 2
    # Work items (tiles of one chunk) with at most this many tokens take the heads path (decode:
    # 1); longer ones the tokens-as-rows path. 0: never; >= block_t: always. Always by default:
    # on an H200 (`bench indexer --scorer pallas-tiles,pallas-heads`, docs/benchmarks.md) the
    # heads path was faster at every measured size, 1.1x-7.3x at 1-64 tokens per step and
    # 1.10x-1.25x at 512-8192 tokens (16K-262K visible entries).
    heads_max: int = 32
    # The heads path's dot: "cols" [block_e, di] x [di, H] (its sum over the heads stays within
    # a warp) or "rows" [H, di] x [di, block_e] (the sum over rows crosses warps).
    heads_as: str = "cols"


TILES = IndexerTiles()
# Prefill tiles: steps of at least PREFILL_MIN_TOKENS tokens score with PREFILL_TILES
# (`tiles_for_step` is the one place that decides). Measured on an H200 (2026-12-01,
# `bench indexer --tokens 8192 --scorer pallas,pallas-prefill`, docs/benchmarks.md): at 8192
# tokens they are 1.06-1.09x faster under "rowselect" and 1.01-1.02x under the loop (8K-128K
# visible entries); smaller steps were not measured, so they keep TILES. Why they win: the heads
# path reads a work item's queries (block_t tokens x 64 heads x 128 dims, bf16: 512 KiB) once per
# block_e entries and does 2 x block_t x block_e x 64 x 128 FLOPs with them: at block_e 128 an
# 8K-token step over 32K visible entries reads 32 GiB of queries (from L2 mostly, 3-5 ms) for
# 4.4 TFLOP (5.6 ms at the H200's rate), as much traffic as work. block_e 256 halves it (the
# key tile, 64 KiB, is read once per item either way); 8 warps keep the [256, heads] float32
# dot result at 64 registers per thread.
PREFILL_TILES = IndexerTiles(block_e=256, num_warps=8)
PREFILL_MIN_TOKENS = 8192
SCORER_PATHS = ("auto", "tiles", "heads")  # `scorer(path=...)`: auto = TILES.heads_max decides
MIN_ROWS = 16  # smallest dot operand dimension Triton takes


# A call of a step of at most LOOP_MAX_TOKENS tokens (decode: models/index_topk.AUTO_MAX_TOKENS)
# whose grid of (entry sub-block, work item) would pass MAX_PROGRAMS programs runs
# MAX_PROGRAMS // items programs along the entries instead, each looping over its sub-blocks up
# to its tile's longest visible prefix (`score_programs`). Prefill steps keep their grid.
LOOP_MAX_TOKENS, MAX_PROGRAMS = 512, 4096


def score_programs(sub_blocks: int, items: int, tokens: int) -> int:
    """Programs along the entries of one scorer call in a step of `tokens` tokens: one per
    sub-block (all launched; those past every visible prefix of their tile exit at once),
    except in steps of at most LOOP_MAX_TOKENS tokens when the grid would pass MAX_PROGRAMS:
    then MAX_PROGRAMS // items, each scoring sub-blocks j, j + that, ... below its tile's
    longest visible prefix (a loop inside the program, on the device). The decode step's "flat"
    top-k scores the whole capacity in one call (models/index_topk.py), whose sub-blocks past
    the real context would otherwise be mostly empty programs: 131,072 at 64 tokens and a
    1M-token cache's 262,144 entries."""
    if tokens > LOOP_MAX_TOKENS or sub_blocks * items <= MAX_PROGRAMS:
        return sub_blocks
    return max(1, MAX_PROGRAMS // items)


def tiles_for(path: str, tiles: IndexerTiles = TILES) -> IndexerTiles:
    """The tiles of a scorer path: "tiles" (tokens as the dots' rows, every item), "heads"
    (the heads path, every item) or "auto" (`tiles.heads_max` decides per work item)."""
    if path not in SCORER_PATHS:
        raise ValueError(f"unknown indexer scorer path {path!r}; known: {list(SCORER_PATHS)}")
    if tiles.heads_as not in ("cols", "rows"):
        raise ValueError(f"heads_as must be 'cols' or 'rows', not {tiles.heads_as!r}")
    if path == "auto":
        return tiles
    return dataclasses.replace(tiles, heads_max=0 if path == "tiles" else tiles.block_t)


def tiles_for_step(tokens: int) -> IndexerTiles:
    """The tiles a step of `tokens` tokens scores with: PREFILL_TILES from PREFILL_MIN_TOKENS
    tokens (when that is > 0), else TILES (both as they are at trace time)."""
    return PREFILL_TILES if 0 < PREFILL_MIN_TOKENS <= tokens else TILES


def chunk_ranges(b):
    """Per buffer index t: [t, t + chunk length) when a real chunk starts at t, else empty."""
    t = jnp.arange(b["pos"].shape[0], dtype=jnp.int32)
    first = b["valid"] & (b["seg_start_idx"] == t)
    return t, jnp.where(first, t + b["seg_end_pos"] - b["seg_start_pos"], t).astype(jnp.int32)


def _kernel(group_ref, tile_ref, count_ref, starts_ref, ends_ref, slot_ref, nvis_ref, e0_ref,
            q_ref, w_ref, pool_ref, pt_ref, o_ref, *, tiles: IndexerTiles, heads: int, dim: int,
            epp: int, max_pages: int, n_rows: int, sub_blocks: int, stride: int):
    j = pl.program_id(0)
    i = pl.program_id(1)
    bt, be = tiles.block_t, tiles.block_e

    @pl.when(i < count_ref[0])
    def _():
        g = group_ref[i]
        row0 = starts_ref[g] + tile_ref[i] * bt
        end = jnp.minimum(ends_ref[g], row0 + bt)
        rows = row0 + jnp.arange(bt, dtype=jnp.int32)
        mine = rows < end
        # output row: the token's row within the call's window of rows (starting at e0_ref[1]);
        # distinct (interpret mode stores masked rows back as they were)
        out_rows = (rows - e0_ref[1]) % n_rows
        rows = jnp.where(mine, rows, row0)
        slot = slot_ref[row0]
        nvis = jnp.where(mine, nvis_ref[rows], 0)
        max_vis = jnp.max(nvis)

        def score(jj):  # sub-block jj of the call's entries (below max_vis)
            first = e0_ref[0] + jj * be
            e = first + jnp.arange(be, dtype=jnp.int32)
            live = e < max_vis
            page = pt_ref[slot * max_pages + jnp.minimum(e // epp, max_pages - 1)]
            addr = jnp.where(live, page * epp + e % epp, 0)
            d = jnp.arange(dim, dtype=jnp.int32)
            keys = plt.load(pool_ref.at[addr[:, None], d[None, :]], mask=live[:, None], other=0.0)
            tf32 = keys.dtype != jnp.float32
            cols = jj * be + jnp.arange(be, dtype=jnp.int32)

            def tokens_as_rows():  # loop over heads: [bt, di] x [di, be] dots
                def head(h, acc):
                    qh = q_ref[(rows * heads + h)[:, None], d[None, :]]
                    s = plt.dot(qh, keys, trans_b=True, allow_tf32=tf32)  # [bt, be] f32
                    return acc + jnp.maximum(s, 0.0) * w_ref[rows * heads + h][:, None]

                acc = jax.lax.fori_loop(0, heads, head, jnp.zeros((bt, be), jnp.float32))
                out = jnp.where(e[None, :] < nvis[:, None], acc, -jnp.inf)
                plt.store(o_ref.at[out_rows[:, None], cols[None, :]], out, mask=mine[:, None])

            def heads_in_dot():  # loop over the item's tokens: one dot of all heads each
                hp = max(MIN_ROWS, 1 << (heads - 1).bit_length())  # Triton: power-of-2 dims
                h = jnp.arange(hp, dtype=jnp.int32)
                real = h < heads
                h = jnp.minimum(h, heads - 1)

                def token(r, carry):
                    qt = plt.load(q_ref.at[(r * heads + h)[:, None], d[None, :]], mask=real[:, None], other=0.0)
                    wt = plt.load(w_ref.at[r * heads + h], mask=real, other=0.0)
                    if tiles.heads_as == "rows":
                        s = plt.dot(qt, keys, trans_b=True, allow_tf32=tf32)  # [hp, be] f32
                        acc = jnp.sum(jnp.maximum(s, 0.0) * wt[:, None], axis=0)  # [be]
                    else:
                        s = plt.dot(keys, qt, trans_b=True, allow_tf32=tf32)  # [be, hp] f32
                        acc = jnp.sum(jnp.maximum(s, 0.0) * wt[None, :], axis=1)  # [be]
                    out = jnp.where(e < nvis_ref[r], acc, -jnp.inf)
                    o_ref[jnp.zeros((be,), jnp.int32) + r - e0_ref[1], cols] = out
                    return carry

                jax.lax.fori_loop(row0, end, token, row0)

            if tiles.heads_max <= 0:
                tokens_as_rows()
            elif tiles.heads_max >= bt:
                heads_in_dot()
            else:
                few = end - row0 <= tiles.heads_max
                pl.when(few)(heads_in_dot)
                pl.when(~few)(tokens_as_rows)

        if stride >= sub_blocks:  # a program per sub-block; those past every visible prefix: nothing to do
            pl.when(e0_ref[0] + j * be < max_vis)(lambda: score(j))
        else:  # sub-blocks j, j + stride, ... up to the tile's longest visible prefix (`score_programs`)
            span = jnp.minimum(max_vis - e0_ref[0], sub_blocks * be) - j * be
            trips = jnp.maximum(span + stride * be - 1, 0) // (stride * be)

            def step(s, carry):
                score(j + s * stride)
                return carry

            jax.lax.fori_loop(0, trips, step, jnp.int32(0))


def block_scores(q, w, ipool, page_table, b, n_visible, e0, epp: int, block: int, max_segments: int,
                 tiles: IndexerTiles | None = None, interpret: bool = False, path: str = "auto"):
    """q [T, H, di] (roped; cast to the pool's dtype for the dots), w [T, H] float32 (scales
    folded in), ipool [N, di], page_table [slots, max_pages], b: the packed batch arrays,
    n_visible [T] (entries each token may see), e0: traced first entry index, max_segments: at
    most this many chunks in the buffer, path: see `tiles_for` -> [T, block] float32 (block a
    multiple of block_e)."""
    return scorer(q, w, ipool, page_table, b, n_visible, epp, block, max_segments, tiles, interpret, path)(e0)


def scorer(q, w, ipool, page_table, b, n_visible, epp: int, block: int, max_segments: int,
           tiles: IndexerTiles | None = None, interpret: bool = False, path: str = "auto", rows: int | None = None):
    """The block scorer `running_topk` calls: e0 -> [T, block] (see `block_scores`). What does
    not depend on e0 (the work list, casts, flattened tables) is computed once, outside the
    caller's loop over blocks. tiles: default the module's TILES as it is at trace time.
    rows: score a window of `rows` tokens per call instead ("rowselect" in
    models/index_topk.py): (e0, r0) -> [rows, block] for the buffer's tokens r0 .. r0 + rows - 1
    (the chunks' ranges clipped to the window; rows past T are not written)."""
    tiles = tiles_for(path, TILES if tiles is None else tiles)
    t, heads, dim = q.shape
    if block % tiles.block_e:
        raise ValueError(f"block {block} must be a multiple of block_e {tiles.block_e}")
    starts, ends = chunk_ranges(b)
    window = t if rows is None else rows
    items = min(window, -(-window // tiles.block_t) + max_segments)
    # Interpret mode stores a tile's masked rows back as they were: they need rows of their own,
    # or they undo a real row's store (a buffer of fewer than block_t tokens).
    n_rows = max(window, tiles.block_t) if interpret else window
    sub_blocks = block // tiles.block_e
    programs = score_programs(sub_blocks, items, t)
    call = pl.pallas_call(
        functools.partial(_kernel, tiles=tiles, heads=heads, dim=dim, epp=epp, max_pages=page_table.shape[1],
                          n_rows=n_rows, sub_blocks=sub_blocks, stride=programs),
        out_shape=jax.ShapeDtypeStruct((n_rows, block), jnp.float32),
        grid=(programs, items),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="indexer_scores",
    )
    slots, nvis = b["slot"].astype(jnp.int32), n_visible.astype(jnp.int32)
    after = (q.reshape(t * heads, dim).astype(ipool.dtype), w.astype(jnp.float32).reshape(-1), ipool,
             page_table.reshape(-1).astype(jnp.int32))
    if rows is None:
        before = (*work_items(starts, ends, tiles.block_t, items), starts, ends, slots, nvis)
        return lambda e0: call(*before, jnp.stack([jnp.asarray(e0, jnp.int32), jnp.int32(0)]), *after)[:t]

    def windowed(e0, r0):
        r0 = jnp.asarray(r0, jnp.int32)
        lo, hi = jnp.clip(starts, r0, r0 + rows), jnp.clip(ends, r0, r0 + rows)
        hi = jnp.maximum(hi, lo)
        return call(*work_items(lo, hi, tiles.block_t, items), lo, hi, slots, nvis,
                    jnp.stack([jnp.asarray(e0, jnp.int32), r0]), *after)[:rows]

    return windowed
