"""The compiled `row_ids` + epilogue check the grouped-GEMM GPU tests share (bf16 and W4A16)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.routings import skewed_sizes
from atom_jax.models.layers import swiglu_clamped


def check_row_ids_and_epilogue(gemm, w, tiles, rng, groups: int, k: int, n: int, rows: int, m: int, trailing: int):
    """`gemm(rows, w, sizes, cfg=, row_ids=, zero_tail=, epilogue=)` loading rows[row_ids[r]]
    itself (the MoE's first GEMMs) against the same kernel on the rows gathered in XLA: the
    outputs agree to accumulation order, rows past the groups are zero; then as the MoE's w3 GEMM
    runs it (SwiGLU epilogue, rows past the groups left unwritten) against the SwiGLU in XLA."""
    sizes = jnp.asarray(skewed_sizes(rng, m - trailing, groups))
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, rows, m), jnp.int32)
    out = np.asarray(jax.jit(lambda a, b, s, i: gemm(a, b, s, cfg=tiles, row_ids=i))(x, w, sizes, ids), np.float32)
    ref = np.asarray(jax.jit(lambda a, b, s: gemm(a, b, s, cfg=tiles))(x[ids], w, sizes), np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    assert np.all(out[m - trailing:] == 0)
    gate = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.bfloat16)
    swiglu = functools.partial(swiglu_clamped, limit=2.0)
    fused = np.asarray(jax.jit(lambda a, b, s, i, gt: gemm(
        a, b, s, cfg=tiles, row_ids=i, zero_tail=False, epilogue=(swiglu, gt)))(x, w, sizes, ids, gate), np.float32)
    want = np.asarray(swiglu(gate.astype(jnp.float32), jnp.asarray(ref)), np.float32)
    valid = m - trailing
    np.testing.assert_allclose(fused[:valid], want[:valid], rtol=2e-2, atol=2e-2 * np.abs(want).max())
