"""Small numeric building blocks shared by every DeepSeek-V4 module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atom_jax.config import ModelConfig, yarn_inv_freq
from atom_jax.kernels.norm_rope import apply_rope, rms_norm  # noqa: F401  (re-exported: the models' names)


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
