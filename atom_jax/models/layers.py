"""Small numeric building blocks shared by every DeepSeek-V4 module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atom_jax.config import ModelConfig, yarn_inv_freq


def rms_norm(x, weight, eps):
    """RMSNorm computed in float32; the weight is float32 too (as DeepSeek keeps it)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        xf = xf * weight.astype(jnp.float32)
    return xf.astype(x.dtype)


def swiglu_clamped(gate, up, limit):
    """SiLU(gate) * up with V4's clamps (gate from above, up on both sides)."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> np.ndarray:
    """Sliding-only layers: plain RoPE at rope_theta; compressed layers: YaRN at compress_rope_theta."""
    if compressed:
        return yarn_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.compress_rope_scaling)
    return yarn_inv_freq(cfg.rope_head_dim, cfg.rope_theta, None)


def rope_cos_sin(positions, inv_freq):
    """cos/sin of shape positions.shape + (rope_dim // 2,), float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(freqs), jnp.sin(freqs)


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


def split_columns(a, widths):
    """a [..., >= sum(widths)] -> the list of its consecutive column blocks of those widths."""
    out, off = [], 0
    for w in widths:
        out.append(a[..., off: off + w])
        off += w
    return out


def normal_param(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std)


def const_param(shape, value, dtype=jnp.float32):
    return nnx.Param(jnp.full(shape, value, dtype))
