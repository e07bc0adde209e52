"""RMSNorm and V4's interleaved-pair RoPE in jnp: the math the model's layers use, kept at the kernels'
level so a kernel's wrapper can apply it around a kernel that does not fuse it (models/layers.py
re-exports both)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps):
    """RMSNorm computed in float32; the weight is float32 too (as DeepSeek keeps it)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        xf = xf * weight.astype(jnp.float32)
    return xf.astype(x.dtype)


def apply_rope(x, cos, sin, inverse: bool = False):
    """Interleaved-pair RoPE on the trailing rope slice of x.

    x: [..., S, (heads,) D]; cos/sin: [..., S, R/2]. When x has a heads axis the caller passes
    cos/sin already expanded (`cos[..., None, :]`). `inverse` rotates by -angle (V4 undoes the
    rotation on the attention output because keys double as values)."""
    half = cos.shape[-1]
    rope_dim = 2 * half
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    rf = rope.astype(jnp.float32).reshape(*rope.shape[:-1], half, 2)
    x0, x1 = rf[..., 0], rf[..., 1]
    if inverse:
        sin = -sin
    r0 = x0 * cos - x1 * sin
    r1 = x1 * cos + x0 * sin
    rotated = jnp.stack([r0, r1], axis=-1).reshape(rope.shape).astype(x.dtype)
    return jnp.concatenate([nope, rotated], axis=-1)


def rope_queries(q, rope, norm_eps):
    """q [T, H, D] as projected -> its weightless per-head RMS norm (norm_eps None: none) and RoPE at
    rope = (cos, sin) [T, R/2]: the attention's query math (models/attention.py `queries`)."""
    return apply_rope(q if norm_eps is None else rms_norm(q, None, norm_eps), rope[0][:, None], rope[1][:, None])


def unrope_output(out, rope):
    """out [T, H, D] -> its RoPE undone at rope = (cos, sin) [T, R/2] (models/attention.py `output`)."""
    return apply_rope(out, rope[0][:, None], rope[1][:, None], inverse=True)
