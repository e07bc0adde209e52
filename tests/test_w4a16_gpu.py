"""The compiled W4A16 grouped GEMM and the FP8 block-scaled dense projection on a GPU against a
float32 reference on the dequantised weights (skewed routings: empty and very large groups).
Run with `JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_w4a16_gpu.py`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import packed
from atom_jax.kernels import w4a16_grouped_gemm as wg
from atom_jax.models.layers import swiglu_clamped
from atom_jax.weights import quant

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("decode", ["ptx", "alu"])
@pytest.mark.parametrize("trailing", [0, 7])
@pytest.mark.parametrize("tiles", [wg.DECODE_TILES, wg.PREFILL_TILES], ids=["decode", "prefill"])
def test_compiled_w4a16_matches_float32_reference(tiles, trailing, decode):
    rng = np.random.default_rng()
    g, k, n, m = 16, 512, 512, 1000
    sizes = skewed_sizes(rng, m - trailing, g)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    out = np.asarray(jax.jit(lambda a, b, s: wg.grouped_gemm(a, b, s, cfg=tiles, decode=decode))(x, w, jnp.asarray(sizes)),
                     np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), dense, sizes)
    assert np.all(np.isfinite(out))
    row_err = np.linalg.norm(out - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
    assert np.all(row_err[:sizes.sum()] < 2e-2)  # bf16 output rounding, every row
    assert np.all(out[sizes.sum():] == 0)


@pytest.mark.parametrize("rows", [37, 300, 2000])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "xla"])
def test_fp8_linear_on_gpu_matches_float32_reference(use_kernel, rows):
    """The compiled FP8 kernel and the XLA decode path, block scales varying over 0.01..9."""
    rng = np.random.default_rng()
    w = rng.standard_normal((1024, 768)).astype(np.float32) * np.repeat(
        rng.uniform(0.01, 9, (8, 6)), 128, 0).repeat(128, 1)
    q, s = quant.quantize_fp8(w)
    dense = quant.dequantize_fp8(q, s)
    x = jnp.asarray(rng.standard_normal((rows, 768)), jnp.bfloat16)
    fn = jax.jit(lambda a, c, sc: packed.fp8_linear(a, c, sc, use_kernel=use_kernel))
    out = np.asarray(fn(x, jnp.asarray(q.view(np.uint8)), jnp.asarray(quant.scale_to_float32(s))), np.float32)
    ref = np.asarray(x, np.float64) @ dense.T
    row_err = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(row_err < 1e-2)  # bf16 output rounding, every row


@pytest.mark.parametrize("tiles", [wg.DECODE_TILES, wg.PREFILL_TILES], ids=["decode", "prefill"])
def test_compiled_w4a16_row_ids_gather_matches_gathered_rows(tiles):
    """`row_ids`: rows[row_ids[r]] loaded inside the kernel (PTX decoder on CUDA) against the
    kernel on the rows gathered in XLA."""
    rng = np.random.default_rng()
    g, k, n, r, m, trailing = 16, 512, 512, 300, 1000, 7
    sizes = jnp.asarray(skewed_sizes(rng, m - trailing, g))
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    w, _ = random_fp4_experts(rng, g, k, n)
    out = np.asarray(jax.jit(lambda a, b, s, i: wg.grouped_gemm(a, b, s, cfg=tiles, row_ids=i))(x, w, sizes, ids),
                     np.float32)
    ref = np.asarray(jax.jit(lambda a, b, s: wg.grouped_gemm(a, b, s, cfg=tiles))(x[ids], w, sizes), np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    assert np.all(out[m - trailing:] == 0)
    # as the MoE's w3 GEMM runs it: SwiGLU epilogue, rows past the groups left unwritten
    gate = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.bfloat16)
    swiglu = functools.partial(swiglu_clamped, limit=2.0)
    fused = np.asarray(jax.jit(lambda a, b, s, i, gt: wg.grouped_gemm(
        a, b, s, cfg=tiles, row_ids=i, zero_tail=False, epilogue=(swiglu, gt)))(x, w, sizes, ids, gate), np.float32)
    want = np.asarray(swiglu(gate.astype(jnp.float32), jnp.asarray(ref)), np.float32)
    valid = m - trailing
    np.testing.assert_allclose(fused[:valid], want[:valid], rtol=2e-2, atol=2e-2 * np.abs(want).max())
