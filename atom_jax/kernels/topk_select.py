"""Sort-free top-k selection of score rows in Pallas (Triton backend: NVIDIA and ROCm;
interpreted on CPU): the kernel stand-in for `models/index_topk.radix_select`, same contract
(indices of the k largest scores of each row, lowest index first among equal scores, listed in
entry order, NO_ENTRY filling rows with fewer than k eligible (> -inf) entries).

One program per row. The row is read in tiles of BLOCK_W entries: 8 counting passes (the
radix search of `radix_select`, DIGIT_BITS = 4 bits per pass: per pass, per lane, 16 counts of
the keys at or above 16 candidate thresholds, summed across lanes once per pass), one pass counting the
keys above the k-th, then one pass keeping every entry above it plus the lowest-index ties and
writing their indices at their rank (a running count plus the tile's prefix sum). About ten
reads of a row of W float32 scores (128 KiB at W = 32K) per program: the rows in flight
(a few per SM) fit the GPU's L2, so the scores come from DRAM about once, where XLA's jnp
passes each read the whole [rows, W] array from DRAM (and its 16-threshold count may read it
once per threshold). The compares dominate: 8 x 16 per entry, 34 G at T = 8192, W = 32K (a few
ms of the integer units); DIGIT_BITS = 2 makes it 16 x 4 compares over twice the passes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

NO_ENTRY = jnp.iinfo(jnp.int32).max  # models/cache_reads.NO_ENTRY (kernels do not import models)
DIGIT_BITS = 4  # bits per counting pass (1, 2, 4 or 8): 32 / DIGIT_BITS passes of 2^DIGIT_BITS compares
BLOCK_W = 512  # entries per tile (a power of two; the counting passes hold 16 x BLOCK_W counts)
NUM_WARPS = 8  # a program holds one row: more warps per row (few rows per call at long context)
NUM_STAGES = 2  # software pipelining of the tiles' loads


def _ordered(x):
    """float32 -> uint32 keys whose unsigned order is the floats' order (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _kernel(s_ref, o_ref, *, k: int, width: int, bw: int, kp: int, stride: int, bits: int):
    r = pl.program_id(0)
    tiles = -(-width // bw)
    cols = jnp.arange(bw, dtype=jnp.int32)

    def load(i):
        c = i * bw + cols
        inside = c < width
        x = plt.load(s_ref.at[r * width + jnp.where(inside, c, 0)], mask=inside, other=-jnp.inf)
        return _ordered(x), c, inside, x > -jnp.inf

    digits = jnp.arange(1 << bits, dtype=jnp.uint32)
    tau = jnp.uint32(0)
    for shift in range(32 - bits, -1, -bits):
        cand = tau | (digits << shift)  # [16], ascending

        def count(i, acc, cand=cand):  # per-lane counts: no cross-thread reduction per tile
            key, _, inside, _ = load(i)
            return acc + ((key[None, :] >= cand[:, None]) & inside[None, :]).astype(jnp.int32)

        cnt = jnp.sum(jax.lax.fori_loop(0, tiles, count, jnp.zeros((1 << bits, bw), jnp.int32)), axis=1)
        d = jnp.sum((cnt >= k).astype(jnp.int32)) - 1  # the largest digit keeping >= k keys (0 always)
        tau = tau | (jnp.maximum(d, 0).astype(jnp.uint32) << shift)

    def above(i, acc):
        key, _, inside, _ = load(i)
        return acc + ((key > tau) & inside).astype(jnp.int32)

    need = k - jnp.sum(jax.lax.fori_loop(0, tiles, above, jnp.zeros((bw,), jnp.int32)))
    out = jnp.arange(kp, dtype=jnp.int32)
    # Masked lanes point past the row's k places (distinct: interpret mode stores them back as
    # they were, which would undo a real lane's store to the same place).
    plt.store(o_ref.at[r * stride + out], jnp.full((kp,), NO_ENTRY, jnp.int32), mask=out < k)

    def keep(i, carry):
        kept, ties = carry
        key, c, inside, finite = load(i)
        real = inside & finite
        tie = ((key == tau) & real).astype(jnp.int32)
        rank = ties + jnp.cumsum(tie) - tie
        take = (((key > tau) & real) | ((tie == 1) & (rank < need))).astype(jnp.int32)
        pos = kept + jnp.cumsum(take) - take
        ok = (take == 1) & (pos < k)
        plt.store(o_ref.at[r * stride + jnp.where(ok, pos, k + cols)], c, mask=ok)
        return kept + jnp.sum(take), ties + jnp.sum(tie)

    jax.lax.fori_loop(0, tiles, keep, (jnp.int32(0), jnp.int32(0)))


def radix_select(s, k: int, interpret: bool = False, block_w: int | None = None, num_warps: int | None = None):
    """s [R, W] float32 (-inf: not eligible) -> [R, k] int32 entry indices (see the module).
    block_w, num_warps: default the module's BLOCK_W and NUM_WARPS as they are at trace time."""
    block_w, num_warps = block_w or BLOCK_W, num_warps or NUM_WARPS
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
    call = pl.pallas_call(
        functools.partial(_kernel, k=k, width=width, bw=bw, kp=kp, stride=stride, bits=DIGIT_BITS),
        out_shape=jax.ShapeDtypeStruct((rows * stride,), jnp.int32),
        grid=(rows,),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
        interpret=interpret,
        name="topk_radix_select",
    )
    return call(s.astype(jnp.float32).reshape(-1)).reshape(rows, stride)[:, :k]
