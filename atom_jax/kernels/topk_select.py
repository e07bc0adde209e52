"""Sort-free top-k selection of score rows in Pallas (Triton backend: NVIDIA and ROCm;
interpreted on CPU): the kernel stand-in for `models/index_topk.radix_select`, same contract
(indices of the k largest scores of each row, lowest index first among equal scores, listed in
entry order, NO_ENTRY filling rows with fewer than k eligible (> -inf) entries).

One program per row, read in tiles of BLOCK_W entries (COMPACT_W in PRUNE's compaction pass)
up to its eligible prefix (n_valid: the token's visible count; the work follows the context, not
the width). The selection proper
(`_select`):
32 / DIGIT_BITS counting passes (the radix search of `radix_select`: per pass, per lane,
2^DIGIT_BITS counts of the keys at or above as many candidate thresholds, summed across lanes
once per pass), one pass counting the keys above the k-th, then one pass keeping every entry
above it plus the lowest-index ties and writing their indices at their rank (a running count
plus the tile's prefix sum). Over a whole row of W entries that is 8 x 16 compares per entry at
the default 4 bits: ~34 G at T = 8192, W = 32K, milliseconds of the integer units.

So with PRUNE (the default) the selection runs on the few entries that can be in the top k:
1. one pass keeps the running maximum of each of G = 4k lanes (lane j: entries j, j + G, ...;
   G strided groups); L, the k-th largest of those G maxima, is at most the row's k-th largest
   score (k groups have a maximum >= L: k distinct entries >= L);
2. one pass writes the indices of the finite entries >= L, in entry order, to a scratch row
   (a running count plus the tile's prefix sum); typically ~k to 2k of them (every entry when
   the row is all ties);
3. a barrier (the scratch is read by other threads of the program), then `_select` over the
   survivors (their scores gathered from the row): the radix search over them finds the same
   k-th largest (it is >= L, and no entry above it is missing), and the survivors keep entry
   order, so the ties go to the same lowest indices.
Two reads of the row plus ~10 ops per entry, the rest on the survivors. The rows in flight (a
few per SM) fit the GPU's L2, so repeated reads of a row come from L2, where XLA's jnp passes
each read the whole [rows, W] array from DRAM."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

NO_ENTRY = jnp.iinfo(jnp.int32).max  # models/cache_reads.NO_ENTRY (kernels do not import models)
DIGIT_BITS = 4  # bits per counting pass (1, 2, 4 or 8): 32 / DIGIT_BITS passes of 2^DIGIT_BITS compares
BLOCK_W = 512  # entries per tile (a power of two; the counting passes hold 2^DIGIT_BITS x BLOCK_W counts)
NUM_WARPS = 8  # a program holds one row: more warps per row (few rows per call at long context)
NUM_STAGES = 2  # software pipelining of the tiles' loads
PRUNE = True  # select among the entries at or above the strided groups' bound (see the module)
PRUNE_GROUPS_PER_K = 4  # G = this x k lanes (rounded up to a power of two)
# Entries per tile of the compaction pass (PRUNE), apart from BLOCK_W (the counting passes' tiles, whose
# [2^DIGIT_BITS, BLOCK_W] counts live in registers). Each tile's prefix sum, sum and scatter store cost
# barriers whatever its width (offline SASS, sm_90a, 8 warps: 8 a tile at 512 entries, 4 at 2,048 or
# 4,096): at 32K visible entries a row's compaction went from 512 barriers (64 tiles of 512) to 64,
# the rest of its selection being ~250; 80 registers a thread at 2,048 as at 512, 114 at 4,096.
# H200 (`bench indexer --tokens 8192 --visible 32768 --scorer none`, session 22): the selection 7.54 ms
# at 512, 7.05 at 2,048, 7.40 at 4,096; the 128K prefill's device time the same at 512 and 2,048.
# 0: BLOCK_W.
COMPACT_W = 2048


def _ordered(x):
    """float32 -> uint32 keys whose unsigned order is the floats' order (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _kth_key(key, k: int):
    """The k-th largest of the uint32 keys [n] held in registers (bit by bit from the top). (Offline
    SASS, session 22: 2 or 4 bits a pass, [2^bits, n] compares each, compiled to more instructions
    and as many barriers.)"""
    tau = jnp.uint32(0)
    for b in range(31, -1, -1):
        cand = tau | jnp.uint32(1 << b)
        tau = jnp.where(jnp.sum((key >= cand).astype(jnp.int32)) >= k, cand, tau)
    return tau


def _select(load, tiles, emit, k: int, bw: int, bits: int):
    """The radix selection over tiles 0 .. tiles - 1 of load(i) -> (key [bw] uint32, entry index
    [bw] int32, real [bw]: a finite score; tail lanes: False). emit(pos, entry, ok) stores the
    kept entries at their rank."""
    digits = jnp.arange(1 << bits, dtype=jnp.uint32)
    tau = jnp.uint32(0)
    for shift in range(32 - bits, -1, -bits):
        cand = tau | (digits << shift)  # ascending

        def count(i, acc, cand=cand):  # per-lane counts: no cross-thread reduction per tile
            key, _, real = load(i)
            return acc + ((key[None, :] >= cand[:, None]) & real[None, :]).astype(jnp.int32)

        cnt = jnp.sum(jax.lax.fori_loop(0, tiles, count, jnp.zeros((1 << bits, bw), jnp.int32)), axis=1)
        d = jnp.sum((cnt >= k).astype(jnp.int32)) - 1  # the largest digit keeping >= k keys (-1: fewer than k)
        tau = tau | (jnp.maximum(d, 0).astype(jnp.uint32) << shift)

    def above(i, acc):
        key, _, real = load(i)
        return acc + ((key > tau) & real).astype(jnp.int32)

    need = k - jnp.sum(jax.lax.fori_loop(0, tiles, above, jnp.zeros((bw,), jnp.int32)))

    def keep(i, carry):
        kept, ties = carry
        key, entry, real = load(i)
        tie = ((key == tau) & real).astype(jnp.int32)
        rank = ties + jnp.cumsum(tie) - tie
        take = (((key > tau) & real) | ((tie == 1) & (rank < need))).astype(jnp.int32)
        pos = kept + jnp.cumsum(take) - take
        emit(pos, entry, (take == 1) & (pos < k))
        return kept + jnp.sum(take), ties + jnp.sum(tie)

    jax.lax.fori_loop(0, tiles, keep, (jnp.int32(0), jnp.int32(0)))


def _kernel(s_ref, n_ref, o_ref, *scratch, k: int, width: int, bw: int, kp: int, stride: int, bits: int, groups: int,
            cw: int, interpret: bool):
    r = pl.program_id(0)
    cols = jnp.arange(bw, dtype=jnp.int32)
    nv = jnp.clip(n_ref[r], 0, width)  # the row's eligible prefix: the tiles past it are never read
    tiles = (nv + bw - 1) // bw
    # Masked lanes point past the row's k places (distinct: interpret mode stores them back as
    # they were, which would undo a real lane's store to the same place).
    out = jnp.arange(kp, dtype=jnp.int32)
    plt.store(o_ref.at[r * stride + out], jnp.full((kp,), NO_ENTRY, jnp.int32), mask=out < k)

    def emit(pos, entry, ok):
        plt.store(o_ref.at[r * stride + jnp.where(ok, pos, k + cols)], entry, mask=ok)

    def row(c, inside):
        x = plt.load(s_ref.at[r * width + jnp.where(inside, c, 0)], mask=inside, other=-jnp.inf)
        return _ordered(x), inside & (x > -jnp.inf)

    if not scratch:  # select over the whole row
        def load(i):
            c = i * bw + cols
            key, real = row(c, c < nv)
            return key, c, real

        _select(load, tiles, emit, k, bw, bits)
        return

    (sel_ref,) = scratch  # [rows, width + cw]: the survivors' entry indices, then masked lanes' room
    lanes = jnp.arange(groups, dtype=jnp.int32)
    ccols = jnp.arange(cw, dtype=jnp.int32)

    def group_max(i, m):
        c = i * groups + lanes
        inside = c < nv
        return jnp.maximum(m, plt.load(s_ref.at[r * width + jnp.where(inside, c, 0)], mask=inside, other=-jnp.inf))

    m = jax.lax.fori_loop(0, (nv + groups - 1) // groups, group_max, jnp.full((groups,), -jnp.inf, jnp.float32))
    bound = _kth_key(_ordered(m), k)
    base = r * (width + cw)

    def compact(i, n):
        c = i * cw + ccols
        key, real = row(c, c < nv)
        take = (real & (key >= bound)).astype(jnp.int32)
        pos = n + jnp.cumsum(take) - take
        plt.store(sel_ref.at[base + jnp.where(take == 1, pos, width + ccols)], c, mask=take == 1)
        return n + jnp.sum(take)

    n = jax.lax.fori_loop(0, (nv + cw - 1) // cw, compact, jnp.int32(0))
    if not interpret:  # the survivors were written by other threads of this program
        plt.debug_barrier()

    def load(i):
        p = i * bw + cols
        inside = p < n
        entry = plt.load(sel_ref.at[base + jnp.where(inside, p, 0)], mask=inside, other=0)
        key, real = row(entry, inside)
        return key, entry, real

    _select(load, (n + bw - 1) // bw, emit, k, bw, bits)


def radix_select(s, k: int, n_valid=None, interpret: bool = False, block_w: int | None = None,
                 num_warps: int | None = None):
    """s [R, W] float32 (-inf: not eligible) -> [R, k] int32 entry indices (see the module).
    n_valid [R]: only each row's first n_valid entries are eligible, and only they are read
    (the others may hold anything: the scorer leaves the blocks past a tile's visible counts
    unwritten); default all W.
    block_w, num_warps: default the module's BLOCK_W and NUM_WARPS as they are at trace time
    (as are DIGIT_BITS, PRUNE and COMPACT_W)."""
    block_w, num_warps = block_w or BLOCK_W, num_warps or NUM_WARPS
    if COMPACT_W & (COMPACT_W - 1) or COMPACT_W < 0:
        raise ValueError(f"COMPACT_W {COMPACT_W} must be 0 or a power of two")
    if block_w & (block_w - 1):
        raise ValueError(f"block_w {block_w} must be a power of two")
    if DIGIT_BITS not in (1, 2, 4, 8):
        raise ValueError(f"DIGIT_BITS must be 1, 2, 4 or 8, not {DIGIT_BITS}")
    rows, width = s.shape
    if width < k:
        raise ValueError(f"{width} entries cannot hold a top-{k}")
    bw = min(block_w, max(16, 1 << (width - 1).bit_length()))
    kp = max(16, 1 << (k - 1).bit_length())
    stride = k + max(bw, kp)  # a row's k places, then room for its masked lanes
    groups = max(16, 1 << (PRUNE_GROUPS_PER_K * k - 1).bit_length())
    cw = min(COMPACT_W or bw, max(16, 1 << (width - 1).bit_length()))
    out_shape = [jax.ShapeDtypeStruct((rows * stride,), jnp.int32)]
    if PRUNE:
        out_shape.append(jax.ShapeDtypeStruct((rows * (width + cw),), jnp.int32))  # the survivors (scratch)
    call = pl.pallas_call(
        functools.partial(_kernel, k=k, width=width, bw=bw, kp=kp, stride=stride, bits=DIGIT_BITS, groups=groups,
                          cw=cw, interpret=interpret),
        out_shape=out_shape,
        grid=(rows,),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
        interpret=interpret,
        name="topk_radix_select",
    )
    n_valid = jnp.full((rows,), width, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    return call(s.astype(jnp.float32).reshape(-1), n_valid)[0].reshape(rows, stride)[:, :k]
