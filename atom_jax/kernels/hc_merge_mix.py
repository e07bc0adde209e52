"""The mHC merge of a block's output and the next block's mixes in one pass over the streams
(Pallas, Triton backend: NVIDIA and ROCm; interpreted on CPU).

Between two blocks the model runs `models.hyper.hc_merge` (new streams [T, n, D] from the old
ones, the block's output and the per-token post / comb weights), then the next block's
`hc_mixes` of the new streams (their sum of squares for the RMS norm and their product with the
block's fn [n * D, m], as the bf16 fn halves hi and lo). XLA runs those as a merge fusion that
also reduces the squares, then a GEMM that reads the new streams back: at an 8K-token prefill
chunk of V4-Flash, 256 MiB of streams written and read again, about 0.2 + 0.08 ms per merge,
seven merges a 4-layer chunk (H200 trace, docs/benchmarks.md session 20). Here a program per
(block of tokens, chunk of D) walks its columns in steps: it loads the n streams' step and the
output's, stores the new streams' step, and adds its squares and its products with fn's hi and lo
rows (two small dots, bf16 x bf16 exact in float32) to float32 accumulators; the chunks' partial
sums are added after (a [T, D / CHUNK_D, m] array). The new streams are written once
and never read back.

The merge's arithmetic is hc_merge's, per element: comb and post rounded to the streams' dtype,
mixed = sum_j comb[j, k] * streams[j] in float32 (left to right), then
dtype(dtype(post[k] * out) + dtype(mixed)). XLA may keep the float32 product unrounded where it
fuses (excess precision), so the two agree to a rounding of the streams' dtype."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_T = 32  # tokens per program (a dot needs >= 16 rows)
BLOCK_D = 64  # stream columns per step of a program's loop
CHUNK_D = 512  # stream columns per program (a second grid axis); its partial sums are added after
NUM_WARPS, NUM_STAGES = 4, 3
MIN_COLS = 16  # the products' columns are padded to this many (and a power of 2) for the dots


def _kernel(s_ref, o_ref, pc_ref, hi_ref, lo_ref, ns_ref, raw_ref, sq_ref, *, t: int, n: int, d: int,
            bt: int, bd: int, dc: int):
    r0 = pl.program_id(0) * bt
    chunk = pl.program_id(1)
    rows = r0 + jnp.arange(bt, dtype=jnp.int32)
    mine = rows < t
    rs = pl.ds(r0, bt)

    def col(ref, c):  # [bt] column c of ref; both indices arrays (interpret mode takes no integer beside a slice)
        return ref.at[rows, jnp.zeros((bt,), jnp.int32) + c]

    def coef(c):  # [bt] float32: column c of pc (post then comb, rounded as hc_merge rounds them)
        return plt.load(col(pc_ref, c), mask=mine, other=0.0)

    post = [coef(k) for k in range(n)]
    comb = [[coef(n + j * n + k) for k in range(n)] for j in range(n)]  # comb[j][k]: stream j into k

    def step(i, carry):
        acc, sq = carry
        c0 = pl.multiple_of(chunk * dc + i * bd, bd)

        def load(ref, col0):  # [bt, bd] float32 of ref's columns col0 .. col0 + bd, this block's rows
            return plt.load(ref.at[rs, pl.ds(col0, bd)], mask=mine[:, None], other=0.0).astype(jnp.float32)

        out = load(o_ref, c0)
        s = [load(s_ref, j * d + c0) for j in range(n)]
        for k in range(n):
            mixed = comb[0][k][:, None] * s[0]
            for j in range(1, n):
                mixed = mixed + comb[j][k][:, None] * s[j]
            prod = (post[k][:, None] * out).astype(ns_ref.dtype).astype(jnp.float32)
            new = (prod + mixed.astype(ns_ref.dtype).astype(jnp.float32)).astype(ns_ref.dtype)
            plt.store(ns_ref.at[rs, pl.ds(k * d + c0, bd)], new, mask=mine[:, None])
            nf = new.astype(jnp.float32)
            sq = sq + jnp.sum(nf * nf, axis=1)
            w = pl.ds(k * d + c0, bd)
            acc = acc + plt.dot(new, hi_ref[w, :]) + plt.dot(new, lo_ref[w, :])
        return acc, sq

    cols = hi_ref.shape[1]
    acc, sq = jax.lax.fori_loop(0, dc // bd, step, (jnp.zeros((bt, cols), jnp.float32), jnp.zeros((bt,), jnp.float32)))
    plt.store(raw_ref.at[rs, pl.ds(chunk * cols, cols)], acc, mask=mine[:, None])  # this chunk's partial sums
    plt.store(col(sq_ref, chunk), sq, mask=mine)


def _widths(d: int, block_d: int | None = None, chunk_d: int | None = None) -> tuple[int, int]:
    """(columns per step, columns per program) for streams of width d."""
    dc = min(chunk_d or CHUNK_D, d)
    return min(block_d or BLOCK_D, dc), dc


def fits(d: int) -> bool:
    """Whether the default tiles divide streams of width d (a program's chunk, and its steps)."""
    bd, dc = _widths(d)
    return d % dc == 0 and dc % bd == 0


def bf16_halves(x):
    """x float32 -> (hi, lo) bf16 with hi + lo = x to ~2^-17 relative: hi = x rounded to bf16,
    lo = the rest rounded. The rounding is a reduce_precision, not a bf16 round trip: XLA on a GPU
    (excess precision allowed, its default) removes a convert to bf16 and back, which makes lo 0."""
    x = x.astype(jnp.float32)
    hi = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def fn_halves(fn):
    """fn [n * D, m] float32 -> (hi, lo) [n * D, m'] bf16 (`bf16_halves`, as models.hyper.hc_mixes
    splits fn), columns zero-padded to m' (>= MIN_COLS, a power of 2)."""
    m = fn.shape[1]
    pad = max(MIN_COLS, pl.next_power_of_2(m)) - m
    return tuple(jnp.pad(h, ((0, 0), (0, pad))) for h in bf16_halves(fn))


def normed_mixes(products, squares, width: int, eps: float):
    """The mixes from `merge_mix`'s products [T, m] and squares [T] of streams `width` wide
    (n * D): models.hyper.hc_mixes' RMS norm, its per-row scale applied after the product."""
    return products * jax.lax.rsqrt(squares / width + eps)[:, None]


def merge_mix(streams, out, post, comb, fn, interpret: bool = False, block_t: int | None = None,
              block_d: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
              chunk_d: int | None = None):
    """streams [T, n, D], out [T, D] (the streams' dtype), post [T, n], comb [T, n, n] float32,
    fn [n * D, m] float32 -> (new streams [T, n, D] as hc_merge(streams, out, post, comb),
    products [T, m] float32 = new streams flattened @ fn, sums of squares [T] float32 of the new
    streams flattened): the mixes are `normed_mixes(products, squares, n * D, eps)`."""
    t, n, d = streams.shape
    m = fn.shape[1]
    bt = block_t or BLOCK_T
    bd, dc = _widths(d, block_d, chunk_d)
    if out.shape != (t, d) or out.dtype != streams.dtype:
        raise ValueError(f"merge_mix: out {out.shape} {out.dtype} for streams {streams.shape} {streams.dtype}")
    if fn.shape[0] != n * d or d % dc or dc % bd:
        raise ValueError(f"merge_mix: fn {fn.shape} for {n} streams of {d} (chunk_d {dc}, block_d {bd})")
    dtype = streams.dtype
    # hc_merge's roundings of the weights: post and comb in the streams' dtype
    pc = jnp.concatenate([post.astype(dtype).astype(jnp.float32).reshape(t, n),
                          comb.astype(dtype).astype(jnp.float32).reshape(t, n * n)], axis=1)
    hi, lo = fn_halves(fn)
    if t == 0:
        return streams, jnp.zeros((0, m), jnp.float32), jnp.zeros((0,), jnp.float32)
    tiles = pl.cdiv(t, bt)
    pad = tiles * bt - t if interpret else 0  # interpret mode clamps slices instead of masking
    rows = (lambda a: jnp.pad(a, ((0, pad), (0, 0)))) if pad else (lambda a: a)  # noqa: E731
    f32 = jnp.float32
    chunks, cols = d // dc, hi.shape[1]
    ns, raw, sq = pl.pallas_call(
        functools.partial(_kernel, t=t, n=n, d=d, bt=bt, bd=bd, dc=dc),
        out_shape=(jax.ShapeDtypeStruct((t + pad, n * d), dtype), jax.ShapeDtypeStruct((t + pad, chunks * cols), f32),
                   jax.ShapeDtypeStruct((t + pad, chunks), f32)),
        grid=(tiles, chunks),
        compiler_params=plt.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
        interpret=interpret,
        name="hc_merge_mix",
    )(rows(streams.reshape(t, n * d)), rows(out), rows(pc), hi, lo)
    products = raw[:t].reshape(t, chunks, cols).sum(axis=1)[:, :m]  # the chunks' partial sums
    return ns[:t].reshape(t, n, d), products, sq[:t].sum(axis=1)
