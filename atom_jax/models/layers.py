"""Small numeric building blocks shared by every DeepSeek-V4 module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atom_jax.config import ModelConfig, yarn_inv_freq
from atom_jax.kernels.norm_rope import apply_rope, rms_norm  # noqa: F401  (re-exported: the models' names)


LOG2E = 1.4426950408889634


def swiglu_clamped(gate, up, limit):
    """SiLU(gate) * up with V4's clamps (gate from above, up on both sides), in float32, rounded
    once to the inputs' type. SiLU as gate / (1 + 2^(-gate log2 e)): the Triton kernels that take
    this as their epilogue (the MoE's w3 GEMM) lower exp2 to one MUFU.EX2, where exp / logistic
    lower to libdevice's range-reduced __nv_expf (offline SASS, the up GEMM at a prefill chunk:
    the epilogue's 3,561 instructions a thread -> 2,179, against ~7,700 in its K loop; on an H200
    the 128K prefill's device time did not measurably change: 918.1 vs 918.4 ms, session 22)."""
    dtype = jnp.result_type(gate, up)
    gate = jnp.minimum(gate.astype(jnp.float32), limit)
    up = jnp.clip(up.astype(jnp.float32), -limit, limit)
    # divided before the product: gate * up could overflow to -inf for a huge negative gate (-inf / inf = NaN)
    return (gate / (1.0 + jnp.exp2(gate * -LOG2E)) * up).astype(dtype)


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
