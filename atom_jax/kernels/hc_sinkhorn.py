"""The mHC mixing matrix's Sinkhorn normalisation as one Pallas kernel (Triton backend).

`models/hyper.py` turns each token's n x n comb logits into a doubly stochastic matrix: a
softmax over each row, then `iters` rounds of column and row normalisation (V4: n = 4, 20
iterations). In XLA that is ~2 x iters dependent reductions over axes of size 4 on a [T, 4, 4]
array, two such blocks per layer: on a GPU each row sum is its own small reduction kernel
(about 40 launches per layer of a few us each, for 16 floats per token). Here every program
holds a block of tokens' n x n entries as n * n vectors in registers and runs the whole
normalisation at once: one launch per mHC block.

`sinkhorn_affine` reads the logits as an affine map of some columns of a wider array (the mHC
comb's: the block's mixes times a scale plus a bias), so the model hands the kernel the mixes
(`models.hyper.comb_of_mixes`).

The arithmetic is the reference's (`models.hyper.sinkhorn_reference`), entry by entry: the
sums of n terms are added left to right (XLA's reduce may pair them differently: results agree
to float32 rounding)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_T = 128  # tokens per program


def _sum(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _kernel(z_ref, a_ref, o_ref, *, t: int, n: int, iters: int, eps: float, block_t: int, col0: int):
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    mine = rows < t

    def at(ref, col):  # entry `col` of the block's tokens; both indices arrays (interpret mode)
        return ref.at[rows, jnp.full((block_t,), col, jnp.int32)]

    def logit(k):  # entry k of the n x n logits: column col0 + k, times the scale plus its bias
        z = plt.load(at(z_ref, col0 + k), mask=mine, other=0.0)
        return z * a_ref[0, k] + a_ref[1, k]

    c = [[logit(a * n + b) for b in range(n)] for a in range(n)]
    for a in range(n):  # softmax over each row, + eps
        top = c[a][0]
        for b in range(1, n):
            top = jnp.maximum(top, c[a][b])
        e = [jnp.exp(x - top) for x in c[a]]
        s = _sum(e)
        c[a] = [x / s + eps for x in e]

    def cols(c):
        s = [_sum([c[a][b] for a in range(n)]) + eps for b in range(n)]
        return [[c[a][b] / s[b] for b in range(n)] for a in range(n)]

    def rows_(c):
        s = [_sum(c[a]) + eps for a in range(n)]
        return [[c[a][b] / s[a] for b in range(n)] for a in range(n)]

    c = cols(c)
    for _ in range(iters - 1):
        c = cols(rows_(c))
    for a in range(n):
        for b in range(n):
            plt.store(at(o_ref, a * n + b), c[a][b], mask=mine)


def sinkhorn_affine(z, n: int, col0: int, scale, bias, iters: int, eps: float, interpret: bool = False,
                    block_t: int = BLOCK_T):
    """The doubly stochastic comb [..., n, n] float32 of the logits z[..., col0 : col0 + n * n]
    (as [..., n, n]) * scale + bias ([n * n]): softmax(logits, -1) + eps, normalised over
    columns, then `iters - 1` times over rows and columns (each sum + eps). The affine is
    applied as the kernel loads the logits: the mHC comb straight from a block's mixes
    (col0 = 2n), so no XLA pass writes the logits first (one launch fewer per call).
    z [..., columns] float32 -> [..., n, n] float32."""
    *lead, width = z.shape
    if width < col0 + n * n or jnp.size(bias) != n * n:
        raise ValueError(f"sinkhorn_affine: z {z.shape}, bias {jnp.shape(bias)}: columns {col0}.. of n = {n}")
    affine = jnp.stack([jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n * n,)),
                        jnp.asarray(bias, jnp.float32).reshape(n * n)])
    z = z.astype(jnp.float32).reshape(-1, width)
    return _call(z, n, iters, eps, interpret, block_t, col0, affine).reshape(*lead, n, n)


def _call(z, n: int, iters: int, eps: float, interpret: bool, block_t: int, col0: int, affine):
    """The kernel over z [T, columns]: logits from columns col0 .. col0 + n * n, times `affine`
    [2, n * n]'s row 0 plus its row 1 -> [T, n * n]."""
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    t = z.shape[0]
    if t == 0:  # no tokens: no launch (a grid of 0 programs)
        return jnp.zeros((0, n * n), jnp.float32)
    block_t = min(block_t, max(16, pl.next_power_of_2(t)))
    tiles = pl.cdiv(t, block_t)
    pad = tiles * block_t - t if interpret else 0  # interpret mode clamps slices instead of masking
    zp = jnp.pad(z, ((0, pad), (0, 0))) if pad else z
    out = pl.pallas_call(
        functools.partial(_kernel, t=t, n=n, iters=iters, eps=float(eps), block_t=block_t, col0=col0),
        out_shape=jax.ShapeDtypeStruct((t + pad, n * n), jnp.float32),
        grid=(tiles,),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="hc_sinkhorn",
    )(zp, affine)
    return out[:t] if pad else out
