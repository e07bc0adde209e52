"""Manifold-constrained hyper-connections (mHC): `hc_mult` residual streams, collapsed before
each block with `pre` weights, re-expanded with `post` weights and mixed with a Sinkhorn-
normalised (doubly stochastic) `comb` matrix."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.kernels.platform import is_cpu
from atom_jax.models.layers import const_param, normal_param
from atom_jax.models.trace_once import traced_once


class HyperConnection(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        n = cfg.hc_mult
        self.fn = normal_param(rngs, (n * cfg.hidden_size, (2 + n) * n), jnp.float32)
        self.base = const_param(((2 + n) * n,), 0.0)
        self.scale = const_param((3,), 1.0)

    @traced_once
    def __call__(self, streams):
        """streams [..., N, D] -> (post [..., N], comb [..., N, N], collapsed [..., D]); float32 weights."""
        return self._from_mixes(streams, hc_mixes(streams, self.fn[...], self.cfg.rms_norm_eps))

    @traced_once
    def after_merge(self, streams, block_out, post, comb):
        """hc_merge(streams, block_out, post, comb), then this block's mHC of the merged streams ->
        (streams', post', comb', collapsed'), as `hc_merge` then `__call__` compute them. Where
        `use_merge_mix` says so, the merge and the mixes are one kernel (kernels/hc_merge_mix.py):
        the merged streams are written once and not read back for the mixes."""
        fn, eps = self.fn[...], self.cfg.rms_norm_eps
        if not use_merge_mix(streams, block_out):
            merged = hc_merge(streams, block_out, post, comb)
            return (merged, *self._from_mixes(merged, hc_mixes(merged, fn, eps)))
        from atom_jax.kernels.hc_merge_mix import merge_mix, normed_mixes
        *lead, n, d = streams.shape
        merged, products, squares = merge_mix(streams.reshape(-1, n, d), block_out.reshape(-1, d),
                                              post.reshape(-1, n), comb.reshape(-1, n, n), fn, interpret=is_cpu())
        mixes = normed_mixes(products, squares, n * d, eps)
        merged = merged.reshape(streams.shape)
        return (merged, *self._from_mixes(merged, mixes.reshape(*lead, -1)))

    def _from_mixes(self, streams, mixes):
        """(post, comb, collapsed) of the streams from their mixes (`hc_mixes`)."""
        n, eps = self.cfg.hc_mult, self.cfg.hc_eps
        base, scale = self.base[...], self.scale[...]
        pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
        post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = comb_of_mixes(mixes, scale[2], base[2 * n:], n, self.cfg.hc_sinkhorn_iters, eps)
        collapsed = jnp.sum(pre[..., None] * streams.astype(jnp.float32), axis=-2).astype(streams.dtype)
        return post, comb, collapsed


def hc_mixes(streams, fn, eps: float):
    """rms_norm(streams [..., N, D] flattened to [..., N * D], in float32) @ fn [N * D, m]
    (float32), without a float32 copy of the streams: the norm's per-row scale is applied to the
    product (the same in exact arithmetic), and bf16 streams multiply fn split into two bf16
    halves, hi = bf16(fn) and lo = bf16(fn - hi), in ONE bf16 product with [hi | lo] that
    accumulates in float32 (bf16 x bf16 products are exact in float32; hi + lo holds fn to
    ~2^-17). So the GEMM reads the bf16 streams once, where the float32 form wrote and re-read
    a float32 copy twice their size (at an 8K-token prefill chunk of V4-Flash, 512 MiB per call,
    two calls per layer)."""
    flat = streams.reshape(*streams.shape[:-2], -1)
    xf = flat.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    fn = fn.astype(jnp.float32)
    if flat.dtype != jnp.bfloat16:
        return (xf @ fn) * inv
    from atom_jax.kernels.hc_merge_mix import bf16_halves
    hi, lo = bf16_halves(fn)
    both = jnp.dot(flat, jnp.concatenate([hi, lo], axis=1), preferred_element_type=jnp.float32)
    m = fn.shape[1]
    return (both[..., :m] + both[..., m:]) * inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sinkhorn_reference(logits, iters: int, eps: float):
    """logits [..., n, n] -> doubly stochastic comb: softmax over each row + eps, normalised
    over columns, then `iters - 1` times over rows and columns (each sum + eps). The jnp path
    (CPU) and the oracle of kernels/hc_sinkhorn.py. Forward unrolled (a GPU runs a rolled loop
    as a while loop that reads its predicate on the host each trip); its gradient is the rolled
    form's (`_sinkhorn_rolled`, the same arithmetic): on an H200 XLA did not finish compiling the
    unrolled form's backward (V4's 20 iterations) in 60 s, the rolled one's took 0.6 s
    (docs/benchmarks.md, session 17)."""
    comb = _sinkhorn_start(logits, eps)
    for _ in range(iters - 1):
        comb = _sinkhorn_step(comb, eps)
    return comb


def _sinkhorn_start(logits, eps: float):  # the row softmax + eps, then the first column normalisation
    comb = jax.nn.softmax(logits, axis=-1) + eps
    return comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)


def _sinkhorn_step(comb, eps: float):
    comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + eps)
    return comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)


def _sinkhorn_rolled(logits, iters: int, eps: float):
    """`sinkhorn_reference`'s arithmetic with its iterations in a fori_loop (differentiated as a
    scan: a backward of one loop body, not of `iters` copies)."""
    return jax.lax.fori_loop(0, iters - 1, lambda _, c: _sinkhorn_step(c, eps), _sinkhorn_start(logits, eps))


def _sinkhorn_reference_fwd(logits, iters, eps):
    return sinkhorn_reference(logits, iters, eps), logits


def _sinkhorn_reference_bwd(iters, eps, logits, g):
    return jax.vjp(lambda x: _sinkhorn_rolled(x, iters, eps), logits)[1](g)


sinkhorn_reference.defvjp(_sinkhorn_reference_fwd, _sinkhorn_reference_bwd)


# "auto": the Pallas kernel (kernels/hc_sinkhorn.py, one launch) where the program is lowered
# for a GPU, the jnp reference on CPU; "jnp": the reference everywhere (the escape hatch where
# the kernel fails on a GPU: set ATOM_JAX_SINKHORN=jnp, read when a program is traced). On a GPU
# the reference is ~2 x iters small reduction kernels per call (about 40 launches per layer at
# V4's 20).
SINKHORN_BACKEND = "auto"
SINKHORN_ENV = "ATOM_JAX_SINKHORN"
SINKHORN_BACKENDS = ("auto", "jnp")


def sinkhorn_backend() -> str:
    """$ATOM_JAX_SINKHORN if set, else SINKHORN_BACKEND; an unknown name is refused."""
    backend = os.environ.get(SINKHORN_ENV) or SINKHORN_BACKEND
    if backend not in SINKHORN_BACKENDS:
        raise ValueError(f"sinkhorn backend {backend!r} (${SINKHORN_ENV} or hyper.SINKHORN_BACKEND): "
                         "choose 'auto' or 'jnp'")
    return backend


def _use_reference() -> bool:
    return sinkhorn_backend() == "jnp" or is_cpu()


def comb_of_mixes(mixes, scale, bias, n: int, iters: int, eps: float):
    """The comb of an mHC block from its mixes [..., (2 + n) * n]: the Sinkhorn of the logits
    mixes[..., 2n:] * scale + bias ([n * n]), by `sinkhorn_backend()`; the kernel takes the
    mixes themselves (kernels/hc_sinkhorn.sinkhorn_affine)."""
    if _use_reference():
        return affine_sinkhorn_reference(mixes, scale, bias, 2 * n, n, iters, eps)
    return affine_sinkhorn_kernel(mixes, scale, bias, 2 * n, n, iters, eps, False)


def affine_sinkhorn_reference(z, scale, bias, col0: int, n: int, iters: int, eps: float):
    """`sinkhorn_reference` of z[..., col0 : col0 + n * n] (as [..., n, n]) * scale + bias."""
    logits = z[..., col0: col0 + n * n].reshape(*z.shape[:-1], n, n) * scale + bias.reshape(n, n)
    return sinkhorn_reference(logits, iters, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def affine_sinkhorn_kernel(z, scale, bias, col0: int, n: int, iters: int, eps: float, interpret: bool):
    """`affine_sinkhorn_reference` by the Pallas kernel, differentiable: its backward is the
    reference's, recomputed (training, train_tiny, on a GPU; the kernel has no VJP of its own)."""
    from atom_jax.kernels import hc_sinkhorn
    return hc_sinkhorn.sinkhorn_affine(z, n, col0, scale, bias, iters, eps, interpret=interpret)


def _affine_sinkhorn_kernel_fwd(z, scale, bias, col0, n, iters, eps, interpret):
    return affine_sinkhorn_kernel(z, scale, bias, col0, n, iters, eps, interpret), (z, scale, bias)


def _affine_sinkhorn_kernel_bwd(col0, n, iters, eps, interpret, res, g):
    out, vjp = jax.vjp(lambda z, s, b: affine_sinkhorn_reference(z, s, b, col0, n, iters, eps), *res)
    return vjp(g.astype(out.dtype))


affine_sinkhorn_kernel.defvjp(_affine_sinkhorn_kernel_fwd, _affine_sinkhorn_kernel_bwd)


# "auto": `HyperConnection.after_merge` runs the merge and the next block's mixes as one kernel
# (kernels/hc_merge_mix.py) where the program is lowered for a GPU, the streams are bf16 and a step
# has at least MERGE_MIX_MIN_TOKENS tokens (prefill chunks; decode steps keep XLA's fusions);
# "jnp": hc_merge then hc_mixes everywhere (the CPU path and the oracle). "jnp" by default: on an
# H200 (session 23, docs/benchmarks.md) the kernel took 1.04-1.23 ms a call at an 8K-token chunk of
# V4-Flash (1.08 at best split over chunks of D) where XLA's merge and mixes took 0.30, and the 128K
# prefill ~100 ms longer with it.
MERGE_MIX_BACKEND = "jnp"
MERGE_MIX_MIN_TOKENS = 1024


def use_merge_mix(streams, block_out) -> bool:
    """Whether `HyperConnection.after_merge` runs the one-pass kernel (see MERGE_MIX_BACKEND)."""
    from atom_jax.kernels import hc_merge_mix
    if MERGE_MIX_BACKEND not in ("auto", "jnp"):
        raise ValueError(f"hyper.MERGE_MIX_BACKEND {MERGE_MIX_BACKEND!r}: choose 'auto' or 'jnp'")
    tokens = streams.size // (streams.shape[-1] * streams.shape[-2])
    return (MERGE_MIX_BACKEND == "auto" and not is_cpu() and streams.dtype == jnp.bfloat16
            and block_out.dtype == streams.dtype and tokens >= MERGE_MIX_MIN_TOKENS
            and hc_merge_mix.fits(streams.shape[-1]))


def hc_merge(streams, block_out, post, comb):
    """New streams: post[k] * block_out + sum_j comb[j, k] * streams[j].

    The sum over the n streams is written out term by term (float32 products and sum, rounded
    once to the streams' dtype, as a dot accumulating in float32 would): elementwise, so XLA
    fuses the whole merge into one pass, where a [.., n, n] x [.., n, D] dot is a batched GEMM
    kernel with K = n (4) and then another pass for the sum, twice per layer."""
    dtype = streams.dtype
    c = comb.astype(dtype).astype(jnp.float32)
    s = streams.astype(jnp.float32)
    n = streams.shape[-2]
    mixed = c[..., 0, :, None] * s[..., 0, None, :]
    for j in range(1, n):
        mixed = mixed + c[..., j, :, None] * s[..., j, None, :]
    return post.astype(dtype)[..., None] * block_out[..., None, :] + mixed.astype(dtype)


class HyperHead(nnx.Module):
    """Collapses the streams once at the end, before the final norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        n = cfg.hc_mult
        self.fn = normal_param(rngs, (n * cfg.hidden_size, n), jnp.float32)
        self.base = const_param((n,), 0.0)
        self.scale = const_param((1,), 1.0)

    def __call__(self, streams):
        mixes = hc_mixes(streams, self.fn[...], self.cfg.rms_norm_eps)
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.cfg.hc_eps
        return jnp.sum(pre[..., None] * streams.astype(jnp.float32), axis=-2).astype(streams.dtype)
