"""Sparse flash attention over the paged cache in Pallas (Triton backend: NVIDIA and ROCm;
interpreted on CPU). Same contract as models/cached_attention.reference_attend.

One program per (token, block of heads[, decode split][, block of value columns]): the heads are
the rows of the dots (V4's attention is MQA: one 512-wide key/value head shared by all query
heads), so a token's keys are read once per head block (and per block of value columns:
AttentionTiles.dv_split, each such program computing the full scores but accumulating only its
output columns). Keys, in blocks of `block_k`, with one online softmax (float32 running max,
sum and accumulator; dots in the inputs' dtype, bf16 on GPU, accumulating in float32):

1. the sliding window, positions p - W + 1 .. p: rows of the token's own chunk straight from
   this step's key rows (causal, never another chunk's: row = chunk start + offset), earlier
   positions from the slot's ring (valid where the ring still holds that position);
2. compressed entries through the slot's page table: every entry w < n_visible[t] (HCA; the
   trip count follows the token's real context) or the indexer's selection (CSA; NO_ENTRY and
   entries at or past n_visible are masked);
3. the per-head sink, which joins the denominator only.

Cost per token: W + (visible or selected entries) keys, never the cache capacity and never the
other tokens of the packed buffer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from atom_jax.kernels.norm_rope import rope_queries, unrope_output


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    # Defaults measured on an H200 (bench long-context, V4-Flash dims, 128K prompt, 1M cache, 8K chunks,
    # 2026-12-01 session 10, docs/benchmarks.md), prefill tok/s / decode ms: 32x32x8 (2 stages) 103.5K /
    # 2.35; 64x32x8 121.6K / 2.12; 64x64x8 with 1 stage and prefetch 125.1K / 2.23 (121.3K for 64x32x8 in
    # that run), without prefetch 123.3K / 2.04 (121.6K for 64x32x8 in that run); 64x64x8 with 2 stages
    # runs out of shared memory; 4 warps lose (64x32x4 99.8K, 64x16x4 85.5K).
    block_h: int = 64  # query heads per program (rows of the dots; >= 16 on GPU): all of V4-Flash's, keys read once
    block_k: int = 64  # keys per step
    num_warps: int = 8  # the [block_h, 512] float32 accumulator needs the registers
    num_stages: int = 1  # 2 stages of 64-key blocks exceed the shared memory
    # prefetch: the window's and the entries' loops load block i + 1's keys (selection -> page table
    # -> pool: dependent loads) before block i's dots, carrying them in registers. At 64x32x8, 2 stages
    # it cost 13% (105.9K vs 121.3K: the registers the accumulator needs); at 64x64x8, 1 stage (no
    # pipelining by Triton) each variant against 64x32x8 in its own run: +3.1% prefill with prefetch,
    # +1.4% without (not yet side by side).
    prefetch: bool = True
    # dv_split: the output's value dim (512) in this many column blocks, one program each (a 4th grid
    # axis): each recomputes the full-width scores q . k and the softmax statistics (cheap FLOPs here)
    # but loads keys' value columns, accumulates and stores only its [block_h, dim / dv_split] slice,
    # so its float32 accumulator takes 1/dv_split of the registers (more programs per SM, or room to
    # pipeline) for dv_split x the score dots and key-row loads. 1: one program holds all columns.
    # Offline, indicative (`python -m atom_jax.bench sass`: pip Triton 3.9 with its TTIR passes, as XLA
    # runs them, on this kernel's Pallas TTIR, not XLA's Triton; ptxas 13.4, sm_90a; 8192 tokens, V4-Flash
    # dims, bf16; session 12): bytes of register spill stores per thread for the CSA (list) kernel [HCA
    # (all) kernel], shared memory in KiB; every variant uses 255 registers per thread:
    #   tiles HxKxW, stages, prefetch   dv_split 1           dv_split 2           dv_split 4
    #   64x64x8, 1, prefetch            1712 [2010], 128     2264 [2672], 160     -
    #   64x64x8, 1, no prefetch         1476 [1460], 128      928 [848], 160      672 [704], 144
    #   64x32x8, 2, prefetch            1384 [1602], 96      1028 [1264], 112     -
    #   64x32x8, 2, no prefetch           52 [32], 160          0 [0], 208          0 [0], 184
    #   64x64x8, 2, no prefetch          584 [604], 256 (*)    20 [4], 352 (*)    (*: > 227 KiB, cannot launch)
    #   64x32x4, 2, no prefetch         2740 [2728], 160      296 [184], 208        0 [0], 184
    # (Session 11's table, from scripts that skipped Triton's TTIR passes, had 2508 [2760] for the
    # default: see the entries' loop table below.) So without prefetch 64x32x8 at 2 stages barely
    # spills even at dv_split 1, and splitting the value dim removes the rest, but not the register cap
    # or the shared memory that hold one program per SM; with prefetch the carried keys eat the saving.
    # To be measured on a GPU (bench long-context --attention-tiles ...x2).
    dv_split: int = 1
    # transpose: compute S^T = K . Q^T [block_k, block_h] and O^T += V^T . P^T [dim, block_h] (the
    # softmax runs down the key axis). Triton gives a dot that feeds another dot warpsPerCTA
    # [num_warps, 1]: with 8 warps and 64 heads as M, both warp groups compute the same 64 x block_k
    # scores (half the QK^T wgmmas are redundant) and hold them twice; transposed, M is the keys
    # (block_k = 128 fills the two warp groups) and the value dim (512), so no warp group repeats work.
    transpose: bool = False
    # dim_chunks: q, each key block and the accumulator as this many [., dim / dim_chunks] column
    # pieces (dv_split 1 only): the scores are the sum of the pieces' dots and each piece of keys,
    # loaded and stored to shared memory on its own, is the values of its accumulator piece. Triton
    # loads a [block_k, 512] key block into registers before storing it to shared memory (at 1 stage,
    # no cp.async): 128 registers a thread at 128 keys x 8 warps on top of the accumulator's 128;
    # in pieces, only one piece's registers need be live at a time.
    dim_chunks: int = 1
    # prefetch_rows (with prefetch off): the entries' loop carries block i + 1's pool row addresses
    # (selection -> page table: dependent loads, [block_k] int32) rather than its keys, so a step
    # waits for one load (its keys, addressed a step ahead), not three in a chain.
    prefetch_rows: bool = False
    # one_window_load: the window's keys in one gathered load per piece from the ring's rows followed by
    # this step's key rows (concatenated outside the kernel: a [slots * W + T, dim] copy per call)
    # instead of a load from each and a select: half the window's load instructions and addresses.
    one_window_load: bool = False
    # fuse_rope: with `attend(..., rope=...)`, the query's per-head RMS norm and RoPE (on its rows as
    # loaded) and the output's inverse RoPE (on the accumulator piece holding the rope columns, through an
    # exact 0/1 permutation dot) run in the kernel; off, in jnp around it: XLA then makes a full pass over
    # q [T, H, 512] before the kernel (read, reduce, rotate, write) and one over the output after it (its
    # concatenate fusions): ~1 GiB of traffic a layer at an 8K-token chunk of V4-Flash.
    fuse_rope: bool = False
    # window_fast: a token whose whole window lies in its own chunk (p - W + 1 >= the chunk's first
    # position: every prefill token from the W-th of its chunk on) loads its window's keys with one
    # load from this step's rows, behind a branch on that scalar condition; the others (a chunk's
    # first W - 1 tokens, decode) take the general path: a load from the step's rows and one from
    # the ring, each masked, and a select between them. Offline (`bench sass`, sliding kernel at
    # 8K tokens) the general path is ~1,040 SASS instructions a thread (the select and its byte
    # permutes ~640), the fast one ~105, of a ~3,600-instruction program.
    # 0: never; 1: every mode; 2: the sliding-only kernel ("none") alone (measured separately: the
    # branch helped the sliding kernel in both runs of session 21, the HCA / CSA kernels not clearly).
    window_fast: int = 0
    # exp2: the softmax in base 2: the scores scaled by scale * log2(e) (one multiply, as the plain
    # scale was), exponentials by exp2 (libdevice's __nv_exp2f: MUFU.EX2) instead of exp (__nv_expf:
    # its range reduction around the MUFU.EX2 is several instructions more per score, 48 exponentials
    # a step per thread at 64 heads x 128 keys); the running max and the sink in the same units, the
    # split path's stored max converted back to natural-log units for `_combine`.
    exp2: bool = False
    # lazy_sum: the softmax denominator kept per score position ([block_k, heads], rescaled and added
    # to elementwise each step) and summed over the keys once after the loop, instead of a sum over
    # the keys (shuffles across lanes and warps, a barrier) every step.
    lazy_sum: bool = False
    # Offline, per step of the entries' loop (`python -m atom_jax.bench sass --tiles ...`, session 12;
    # same tools as the dv_split table; SASS by nvdisasm; per thread, 8 warps, one program per SM;
    # instructions, spill (local) load/store bytes; HGMMA = Hopper wgmma, every variant uses it, never
    # mma.sync; key loads are LDG.128 throughout). In brackets session 11's spill bytes, from scripts that
    # compiled the Pallas TTIR without Triton's TTIR passes (triton.compile starts a .ttir source after
    # them; XLA runs them), so without the combine below:
    #   tiles (spec)                   keys  HCA instr  HCA spill B         CSA instr  CSA spill B         MACs/wg
    #   default 64x64x8x1x1             64   2042       1146/582 [1368/880]  2070      1200/412 [1372/632]  3.1M (QK 2x)
    #   64x64x8x1x0 (no prefetch)       64   1518        588/132 [900/388]   1759       728/192 [932/388]   3.1M
    #   64x128x8x1x0x1x1 (transpose)   128   2392        464/216 [576/332]   3017       516/236 [556/292]   4.2M (no 2x)
    #   ... x4 (dim_chunks 4)          128   1916        220/0 [428/188]     2013       232/0 [432/180]     4.2M
    #   ... x4x1 (+ prefetch_rows)     128   1963        248/12 [432/188]    2094       292/52 [448/184]    4.2M
    #   ... x4x1x1 (+ one_window_load) 128   2107        836/164 [972/296]   2226       868/188             4.2M
    # Pallas writes every dot as tt.dot(a, b, 0); Triton's combine pattern (Combine.td: add(dot(a, b, 0),
    # c) in either order -> dot(a, b, c) where the dot's one use is that add) makes `acc * alpha + pv(v)`
    # tt.dot(p, v, acc * alpha), and each head-dim piece's score dot accumulate into the previous
    # piece's (tests/test_bench_sass.py checks the kernel keeps that shape), so the dot's result is never
    # held beside the accumulator. Per 64 keys the default's 2042 instructions and 1728 B of spill
    # traffic a thread against 958 and 110 B transposed in 4 pieces (wgmma MACs a warp group per 64 keys
    # 3.1M -> 2.1M). What still spills: the prefetched keys carried across steps (64-128 registers
    # beside the accumulator's 128) and the default's duplicated scores. A sliding (none) program, ptxas
    # spill stores for the whole kernel: default 480 B (1472 without the passes), 64x64x8x1x0 336, x4
    # 100, x4x1x1 none (221 registers).
    # To be measured: `bench attention`.


# The kernel's tiles (the dataclass's field defaults are the plain layout that `bench long-context
# --attention-tiles HxKxW...` specs start from). Measured on an H200, 2026-12-01 session 13 (`bench
# attention`, 8K tokens at 128K, V4-Flash dims, ms per call for HCA / CSA / sliding; `bench long-context`,
# 128K prompt, 1M cache, 8K chunks, prefill tok/s, same run): the plain 64x64x8 with prefetch 17.39 /
# 10.25 / 2.11 ms, 108.7K tok/s; transposed 128 keys in 4 column pieces with the next block's row
# addresses 5.73 / 4.58 / 1.30 ms, 134.4K tok/s (1.24x; decode 1.99 vs 2.21 ms/token at 128K). S^T = K . Q^T
# gives the two warp groups disjoint key rows (no duplicated scores) and the pieces keep the key
# registers to one piece's: spill 220 B per 128 keys a thread against 1728 per 64 (offline table above).
# fuse_rope, 2026-12-02 session 14, same tiles otherwise, same run: bench attention HCA / CSA / sliding 6.57 /
# 5.26 / 2.04 ms (the jnp norm/RoPE passes around the kernel included) -> 6.04 / 4.60 / 1.44 ms; bench long-context
# 128K 126.1K -> 132.7K tok/s (this card ran the s13 default 5% slower than s13's did).
# Tried in session 14 and dropped (docs/benchmarks.md): 32 or 16 heads a program (1.26x and more the chunk's
# time); 64 keys a step costs the same 10.8 us as 128 (the step's latency, not its keys); 2-3 pipeline stages
# (64 keys, 4 pieces) and 256-key blocks, even with the values re-loaded piece by piece, ask 256-336 KiB of
# shared memory (227 available); re-loading the values at 128 keys costs 1.33x (HCA) and 1.52x (CSA).
TILES = AttentionTiles(block_k=128, prefetch=False, transpose=True, dim_chunks=4, prefetch_rows=True, fuse_rope=True,
                       window_fast=1, exp2=True, lazy_sum=True)
MIN_ROWS = 16  # smallest dot operand dimension Triton takes
ROPE_PIECE_MAX = 128  # widest accumulator piece whose inverse RoPE the kernel applies (fuse_rope)
# Decode: a token's HCA entries (8192 at 1M context) are shared out to this many programs, each
# a partial softmax that `_combine` merges (flash-decoding), instead of one program's long loop.
DECODE_SPLITS, SPLIT_MAX_TOKENS = 16, 64
_NEG = -1e30  # running max start: finite, so fully masked blocks give exp(-inf) = 0, never NaN
LOG2E = 1.4426950408889634  # log2(e): natural-log scores times this are base-2 ones (AttentionTiles.exp2)


def _kernel(pos_ref, slot_ref, ssi_ref, ssp_ref, nvis_ref, q_ref, kv_ref, ring_ref, rpos_ref,
            pool_ref, pt_ref, sel_ref, sink_ref, cos_ref, sin_ref, *out_refs, tiles: AttentionTiles, dim: int,
            win: int, scale: float, mode: str, epp: int, max_pages: int, n_sel: int, splits: int,
            heads_total: int, rope_dim: int, norm_eps: float | None, rope_out: bool):
    t = pl.program_id(0)
    hb = pl.program_id(1)
    sp = pl.program_id(2)  # split of the HCA entries (decode: several programs per token)
    bh, bk, nv = tiles.block_h, tiles.block_k, tiles.dv_split
    heads = hb * bh + jnp.arange(bh, dtype=jnp.int32)
    d = jnp.arange(dim, dtype=jnp.int32)
    dvb = pl.program_id(3) if nv > 1 else 0  # this program's block of value columns
    dv = d if nv == 1 else dvb * (dim // nv) + jnp.arange(dim // nv, dtype=jnp.int32)
    trow = jnp.zeros((bh, 1), jnp.int32) + t
    nc = tiles.dim_chunks
    pieces = (d,) if nc == 1 else tuple(c * (dim // nc) + jnp.arange(dim // nc, dtype=jnp.int32) for c in range(nc))
    pieces_lo = tuple(c * (dim // nc) for c in range(nc))  # static first column of each piece
    qs = [q_ref[trow, heads[:, None] * dim + c[None, :]] for c in pieces]  # [bh, dim / nc] each
    rot = functools.partial(_rotate, cos_ref, sin_ref, t, dim, rope_dim)
    if rope_dim:  # q arrives as projected: the per-head RMS norm and the RoPE here (`attend`'s `rope`)
        qs = _prepare_queries(q_ref, trow, heads, dim, rope_dim, pieces, pieces_lo, qs, rot, norm_eps)
    kcols = pieces if nv == 1 else (d, dv)  # columns of each key load: score pieces [, this program's values]
    outs = pieces if nv == 1 else (dv,)  # columns of each accumulator piece
    outs_lo = pieces_lo if nv == 1 else (None,)  # None: not static (this program's value block)
    # a per-head vector [bh] against scores / accumulators (transpose: heads are their columns)
    per_head = (lambda x: x[None, :]) if tiles.transpose else (lambda x: x[:, None])  # noqa: E731
    p, slot, ssi, ssp = pos_ref[t], slot_ref[t], ssi_ref[t], ssp_ref[t]
    cols = jnp.arange(bk, dtype=jnp.int32)
    # the softmax's units: natural log (exp), or base 2 (exp2, the scores scaled by log2(e) as well)
    unit, ex = (LOG2E, jnp.exp2) if tiles.exp2 else (1.0, jnp.exp)

    def update(carry, *loaded):  # loaded: (*key pieces (kcols), ok); carry: (m, l, *accumulator pieces (outs))
        m, l, accs = carry[0], carry[1], carry[2:]
        *keys, ok = loaded
        vals = keys if nv == 1 else keys[1:]
        keys = keys if nv == 1 else keys[:1]
        exact = keys[0].dtype == jnp.float32  # float32 models (tests): no TF32 rounding
        dot = functools.partial(plt.dot, allow_tf32=not exact)
        # scores [bh, bk] (transpose: scores^T [bk, bh], the softmax down axis 0, acc^T [dim, bh])
        if tiles.transpose:
            s = functools.reduce(jnp.add, [dot(k, qc, trans_b=True) for k, qc in zip(keys, qs)]) * (scale * unit)
        else:
            s = functools.reduce(jnp.add, [dot(qc, k, trans_b=True) for k, qc in zip(keys, qs)]) * (scale * unit)
        kax = 0 if tiles.transpose else 1  # the key axis of s
        s = jnp.where(ok[:, None] if tiles.transpose else ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=kax))
        alpha = ex(m - m_new)
        pr = ex(s - per_head(m_new))
        l = l * per_head(alpha) + pr if tiles.lazy_sum else l * alpha + jnp.sum(pr, axis=kax)
        pv = (lambda v: dot(v, pr.astype(v.dtype), trans_a=True)) if tiles.transpose else \
            (lambda v: dot(pr.astype(v.dtype), v))
        # dot + add, as Triton's combine folds them into tt.dot(p, v, acc * alpha): the dot's result
        # used once, by the add (tests/test_bench_sass.py), or it is held beside the accumulator
        return (m_new, l, *(a * per_head(alpha) + pv(v) for a, v in zip(accs, vals)))

    def keys_at(ref, row, ok):  # the key pieces [, value columns] of rows `row` of `ref` (loaded where ok), and ok
        return (*(plt.load(ref.at[row[:, None], c[None, :]], mask=ok[:, None], other=0.0) for c in kcols), ok)

    chunk_base = ring_ref.shape[0] if tiles.one_window_load else 0  # this step's first row in kv_ref

    def window_keys(i, live=None):  # window block i's keys [, value columns] and validity; `live` unused:
        # blocks i >= n_win load nothing anyway
        j = p - win + 1 + i * bk + cols  # positions
        in_win = (i * bk + cols < win) & (sp == 0)  # the window is split 0's alone
        if tiles.window_fast == 1 or (tiles.window_fast == 2 and mode == "none"):
            return jax.lax.cond(p - win + 1 >= ssp, chunk_window_keys, any_window_keys, j, in_win)
        return any_window_keys(j, in_win)

    def chunk_window_keys(j, in_win):  # the block when the whole window is in this step's rows
        return keys_at(kv_ref, jnp.where(in_win, ssi + j - ssp, 0) + chunk_base, in_win)

    def any_window_keys(j, in_win):  # the block from this step's rows and the slot's ring
        in_chunk = j >= ssp
        ring_row = slot * win + jax.lax.rem(j + win, win)
        rp = plt.load(rpos_ref.at[ring_row], mask=in_win & ~in_chunk, other=-1)
        ok_chunk = in_win & in_chunk
        ok_ring = in_win & ~in_chunk & (j >= 0) & (rp == j)
        chunk_row = jnp.where(ok_chunk, ssi + j - ssp, 0)
        if tiles.one_window_load:  # kv_ref: the ring's rows, then this step's
            return keys_at(kv_ref, jnp.where(ok_chunk, chunk_base + chunk_row, jnp.where(ok_ring, ring_row, 0)),
                           ok_chunk | ok_ring)

        def rows(c):  # columns c of the block's keys
            kc = plt.load(kv_ref.at[chunk_row[:, None], c[None, :]], mask=ok_chunk[:, None], other=0.0)
            kr = plt.load(ring_ref.at[jnp.where(ok_ring, ring_row, 0)[:, None], c[None, :]],
                          mask=ok_ring[:, None], other=0.0)
            return jnp.where(ok_chunk[:, None], kc, kr)
        return (*(rows(c) for c in kcols), ok_chunk | ok_ring)

    def entry_rows(i, live=True):  # block i's pool rows and validity (nothing loaded where not live)
        if mode == "all":
            e = i * bk + cols
            ok = (e < nvis) & live
        else:
            e = plt.load(sel_ref.at[jnp.zeros((bk,), jnp.int32) + t, i * bk + cols],
                         mask=(i * bk + cols < n_sel) & live, other=-1)
            ok = (e >= 0) & (e < nvis)
        e = jnp.where(ok, e, 0)
        page = pt_ref[slot * max_pages + jnp.minimum(e // epp, max_pages - 1)]
        return jnp.where(ok, page * epp + e % epp, 0), ok

    def pool_keys(addr, ok):  # the key pieces [, value columns] of pool rows addr, and ok
        return keys_at(pool_ref, addr, ok)

    def entry_keys(i, live=True):  # block i's keys [, value columns] and validity
        return pool_keys(*entry_rows(i, live))

    n_carry = 2 + len(outs)

    def blocks(lo, hi, carry, load, rows=None):
        """`update` over key blocks lo .. hi - 1 of load(i, live); with `prefetch`, block i + 1's
        keys (loaded where live) before block i's dots, carried in registers; with `prefetch_rows`
        and `rows` (the entries' loop), block i + 1's row addresses rows(i + 1, live)."""
        if not tiles.prefetch and tiles.prefetch_rows and rows is not None:
            def body_rows(i, c):
                cur = pool_keys(*c[n_carry:])
                nxt = rows(i + 1, i + 1 < hi)
                return (*update(c[:n_carry], *cur), *nxt)
            return jax.lax.fori_loop(lo, hi, body_rows, (*carry, *rows(lo, lo < hi)))[:n_carry]
        if not tiles.prefetch:
            return jax.lax.fori_loop(lo, hi, lambda i, c: update(c, *load(i)), carry)

        def body(i, c):
            nxt = load(i + 1, i + 1 < hi)
            return (*update(c[:n_carry], *c[n_carry:]), *nxt)
        return jax.lax.fori_loop(lo, hi, body, (*carry, *load(lo, lo < hi)))[:n_carry]

    l0 = jnp.zeros(((bk, bh) if tiles.transpose else (bh, bk)) if tiles.lazy_sum else (bh,), jnp.float32)
    carry = (jnp.full((bh,), _NEG, jnp.float32), l0,
             *(jnp.zeros((c.shape[0], bh) if tiles.transpose else (bh, c.shape[0]), jnp.float32) for c in outs))
    # The window is split 0's alone: the other splits skip its loop (a cond around a loop of
    # static trip count; a bound chosen with jnp.where(sp == 0, ...) made jax 0.11.2's Triton
    # compile fail on an H200: 'scf.for' bounds of different types). Running it masked in every
    # split cost each of the 16 decode programs per token the window's dots for nothing.
    n_win = -(-win // bk)
    def window_loop(c):
        return blocks(0, n_win, c, window_keys)
    carry = window_loop(carry) if splits == 1 else jax.lax.cond(sp == 0, window_loop, lambda c: c, carry)
    if mode != "none":
        nvis = nvis_ref[t]
        n_blocks = (nvis + bk - 1) // bk if mode == "all" else -(-n_sel // bk)
        per = (n_blocks + splits - 1) // splits
        carry = blocks(sp * per, jnp.minimum(n_blocks, sp * per + per), carry, entry_keys, entry_rows)
    m, l, accs = carry[0], carry[1], carry[2:]
    if tiles.lazy_sum:
        l = jnp.sum(l, axis=0 if tiles.transpose else 1)

    def store(ref, rows, c, val):  # val [len(rows), len(c)] (transpose: [len(c), len(rows)]) at row t
        if tiles.transpose:
            ref[trow.T, rows[None, :] * dim + c[:, None]] = val
        else:
            ref[trow, rows[:, None] * dim + c[None, :]] = val
    if splits == 1:
        sink = sink_ref[heads] * unit
        m_new = jnp.maximum(m, sink)
        alpha = ex(m - m_new)
        l = l * alpha + ex(sink - m_new)
        for acc, c, lo in zip(accs, outs, outs_lo):
            o = (acc * per_head(alpha / l)).astype(out_refs[0].dtype)
            if rope_out and _holds_rope(lo, c.shape[0], dim, rope_dim):  # undo the RoPE at the query's position
                o = rot(c, o, dims_axis=0 if tiles.transpose else 1, inverse=True)
            store(out_refs[0], heads, c, o)
    else:  # partial softmax state of this split; `_combine` merges the splits and the sink
        m_ref, l_ref, acc_ref = out_refs
        col = sp * heads_total + heads

        def stats():  # identical in every value-column block: block 0 writes them
            m_ref[trow[:, 0], col] = m / unit  # natural-log units, as `_combine` takes them
            l_ref[trow[:, 0], col] = l
        if nv == 1:
            stats()
        else:
            pl.when(dvb == 0)(stats)
        for acc, c in zip(accs, outs):
            store(acc_ref, col, c, acc)


def _holds_rope(lo: int | None, width: int, dim: int, rope_dim: int) -> bool:
    """Whether a piece of `width` columns from `lo` (None: not known statically) may hold rope columns."""
    return lo is None or lo + width > dim - rope_dim


def _rotate(cos_ref, sin_ref, t, dim: int, rope_dim: int, c, x, *, dims_axis: int, inverse: bool, swapped=None):
    """x's columns c (an index vector along `dims_axis`) with models/layers.apply_rope's rotation at token
    t's angle: x[j] cos + x[j ^ 1] (-sin for even j, +sin for odd; the other way with `inverse`) on the
    last rope_dim columns, x[j] elsewhere (cos 1, sin 0), in float32 like apply_rope, then x's dtype.
    x[j ^ 1] is `swapped` where given (q: loaded so), else x times a 0/1 permutation matrix: an exact dot
    (each result is one element times 1, plus zeros), as registers cannot be permuted directly."""
    half = rope_dim // 2
    off = c - (dim - rope_dim)
    in_rope = off >= 0
    k = t * half + jnp.where(in_rope, off // 2, 0)
    cos = plt.load(cos_ref.at[k], mask=in_rope, other=1.0)
    sin = plt.load(sin_ref.at[k], mask=in_rope, other=0.0)
    odd = jax.lax.rem(c, 2) == 1
    sin = jnp.where(odd, -sin, sin) if inverse else jnp.where(odd, sin, -sin)
    if swapped is None:
        i = jnp.arange(c.shape[0], dtype=jnp.int32)
        pm = (i[:, None] == (i + 1 - 2 * jax.lax.rem(i, 2))[None, :]).astype(x.dtype)  # symmetric
        exact = x.dtype == jnp.float32
        swapped = plt.dot(x, pm, allow_tf32=not exact) if dims_axis == 1 else plt.dot(pm, x, allow_tf32=not exact)
    along = (lambda v: v[None, :]) if dims_axis == 1 else (lambda v: v[:, None])  # noqa: E731
    return (x.astype(jnp.float32) * along(cos) + swapped.astype(jnp.float32) * along(sin)).astype(x.dtype)


def _prepare_queries(q_ref, trow, heads, dim: int, rope_dim: int, pieces, pieces_lo, qs, rot, norm_eps):
    """q's pieces [bh, width] as projected -> normed (models/layers.rms_norm without weight: float32, then
    q's dtype) and roped (apply_rope), the pair partners of the rope columns loaded from q_ref."""
    r = None
    if norm_eps is not None:
        qf = [x.astype(jnp.float32) for x in qs]
        r = jax.lax.rsqrt(functools.reduce(jnp.add, [jnp.sum(x * x, axis=1) for x in qf]) / dim + norm_eps)[:, None]
        qs = [(x * r).astype(q_ref.dtype) for x in qf]
    out = []
    for x, c, lo in zip(qs, pieces, pieces_lo):
        if _holds_rope(lo, c.shape[0], dim, rope_dim):
            partner = c + 1 - 2 * jax.lax.rem(c, 2)
            in_rope = c >= dim - rope_dim
            sw = plt.load(q_ref.at[trow, heads[:, None] * dim + partner[None, :]], mask=in_rope[None, :], other=0.0)
            if r is not None:
                sw = (sw.astype(jnp.float32) * r).astype(q_ref.dtype)
            x = rot(c, x, dims_axis=1, inverse=False, swapped=sw)
        out.append(x)
    return out


def attend(q, kv, ring_kv, ring_pos, b, sinks, scale, pool=None, page_table=None, epp=1,
           n_visible=None, selected=None, tiles: AttentionTiles | None = None, interpret: bool = False,
           splits: int | None = None, rope=None, norm_eps: float | None = None):
    """q [T,H,hd]; kv [T,hd] this step's key rows; ring_kv [slots,W,hd] / ring_pos [slots,W] as
    before this step; pool [N,hd] compressed entries (None: sliding only); page_table
    [slots, max_pages]; n_visible [T]; selected [T,k] entry indices (CSA) or None (HCA: every
    visible entry). splits: programs per token sharing its HCA entries (None: DECODE_SPLITS for
    steps of at most SPLIT_MAX_TOKENS tokens, else 1). tiles: default the module's TILES as it is
    at trace time (`bench long-context --attention-tiles` swaps it). rope: None (q arrives normed and
    roped, the output leaves as attended), or (cos, sin) [T, R/2] float32 at each token's position: q
    arrives as projected, gets the per-head RMS norm (norm_eps; None: none) and the RoPE, and the output
    leaves with the RoPE undone (models/attention.py's `queries` and `output`), inside the kernel where
    tiles.fuse_rope, else in jnp around it. -> [T,H,hd] in q's dtype."""
    tiles = tiles or TILES
    t, h0, dim = q.shape
    fuse = rope is not None and tiles.fuse_rope
    if rope is not None and not fuse:
        q = rope_queries(q, rope, norm_eps)
    if h0 < MIN_ROWS:  # Triton dots need >= 16 rows: zero heads (a sink of 0) fill up, then go
        q = jnp.pad(q, ((0, 0), (0, MIN_ROWS - h0), (0, 0)))
        sinks = jnp.pad(sinks, (0, MIN_ROWS - h0))
    h = q.shape[1]
    slots, win, _ = ring_kv.shape
    bh = min(tiles.block_h, h)
    if h % bh:
        raise ValueError(f"{h} heads do not split into blocks of {bh}")
    if tiles.dv_split < 1 or dim % tiles.dv_split:
        raise ValueError(f"value dim {dim} does not split into {tiles.dv_split} column blocks")
    if tiles.dim_chunks < 1 or dim % tiles.dim_chunks or (tiles.dim_chunks > 1 and tiles.dv_split > 1):
        raise ValueError(f"head dim {dim} does not split into {tiles.dim_chunks} pieces (dv_split 1 only)")
    tiles = dataclasses.replace(tiles, block_h=bh)
    mode = "none" if pool is None else ("all" if selected is None else "list")
    if pool is None:
        pool = jnp.zeros((1, dim), kv.dtype)
        page_table = jnp.zeros((slots, 1), jnp.int32)
        n_visible = jnp.zeros((t,), jnp.int32)
    sel = selected if selected is not None else jnp.zeros((t, 1), jnp.int32)
    if splits is None:
        splits = DECODE_SPLITS if mode == "all" and t <= SPLIT_MAX_TOKENS else 1
    # the output's rope columns in the kernel: one program holds the whole softmax (no split) and the
    # piece holding them is narrow enough for the permutation dot (a [512, 512] one would cost a key step)
    piece = dim // max(tiles.dim_chunks, tiles.dv_split)
    rope_out = fuse and splits == 1 and piece <= ROPE_PIECE_MAX
    rope_dim = 2 * rope[0].shape[-1] if fuse else 0
    cos, sin = (jnp.asarray(x, jnp.float32).reshape(-1) for x in rope) if fuse else (jnp.zeros((1,), jnp.float32),) * 2
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    out_shape = jax.ShapeDtypeStruct((t, h * dim), q.dtype) if splits == 1 else \
        (f32(t, splits * h), f32(t, splits * h), f32(t, splits * h * dim))
    call = pl.pallas_call(
        functools.partial(_kernel, tiles=tiles, dim=dim, win=win, scale=float(scale), mode=mode, epp=epp,
                          max_pages=page_table.shape[1], n_sel=sel.shape[1], splits=splits, heads_total=h,
                          rope_dim=rope_dim, norm_eps=norm_eps if fuse else None, rope_out=rope_out),
        out_shape=out_shape,
        grid=(t, h // bh, splits, *((tiles.dv_split,) if tiles.dv_split > 1 else ())),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"sparse_attention_{mode}",
    )
    def window_rows(kv, ring):  # (kv_ref, ring_ref): with one_window_load, kv_ref holds the ring's rows first
        return (jnp.concatenate([ring, kv]) if tiles.one_window_load else kv), ring
    out = call(i32(b["pos"]), i32(b["slot"]), i32(b["seg_start_idx"]), i32(b["seg_start_pos"]), i32(n_visible),
               q.reshape(t, h * dim),
               *window_rows(kv.astype(q.dtype), ring_kv.reshape(slots * win, dim).astype(q.dtype)),
               i32(ring_pos).reshape(-1), pool.astype(q.dtype), i32(page_table).reshape(-1),
               jnp.where(sel == jnp.iinfo(jnp.int32).max, -1, i32(sel)), sinks.astype(jnp.float32), cos, sin)
    if splits > 1:
        out = _combine(*out, sinks.astype(jnp.float32), splits, h, dim).astype(q.dtype)
    out = out.reshape(t, h, dim)[:, :h0]
    if rope is not None and not rope_out:
        out = unrope_output(out, rope)
    return out


def _combine(m, l, acc, sinks, splits: int, h: int, dim: int):
    """Merge the splits' partial softmax states [T, S*H] and the per-head sink -> [T, H*dim]."""
    t = m.shape[0]
    m, l, acc = m.reshape(t, splits, h), l.reshape(t, splits, h), acc.reshape(t, splits, h, dim)
    top = jnp.maximum(jnp.max(m, axis=1), sinks[None, :])  # [T, H]
    w = jnp.exp(m - top[:, None])  # [T, S, H]
    denom = jnp.sum(w * l, axis=1) + jnp.exp(sinks[None, :] - top)
    return (jnp.sum(w[..., None] * acc, axis=1) / denom[..., None]).reshape(t, h * dim)
