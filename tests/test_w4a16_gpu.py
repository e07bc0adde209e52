"""The compiled W4A16 grouped GEMM and the FP8 block-scaled dense projection on a GPU against a
float32 reference on the dequantised weights (skewed routings: empty and very large groups).
Run with `JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_w4a16_gpu.py`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from row_ids_check import check_row_ids_and_epilogue
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import packed
from atom_jax.kernels import w4a16_grouped_gemm as wg
from atom_jax.kernels.pallas_grouped_gemm import TileConfig
from atom_jax.weights import quant

pytestmark = pytest.mark.gpu

# The swap-AB variant (W^T . A^T per K step) at the decode tiles and with 8-row tiles.
SWAP_TILES = [dataclasses.replace(wg.DECODE_TILES, swap_ab=True),
              dataclasses.replace(wg.DECODE_TILES, block_m=8, swap_ab=True)]
# The GEMV variant (no MMA) at its tiles (4-row items) and with 1-row items and the register
# prefetch (every group of the skewed routing runs as many items).
GEMV_TILES = [wg.GEMV_TILES, dataclasses.replace(wg.GEMV_TILES, block_m=1, block_k=128, num_stages=2)]
TILES = [wg.DECODE_TILES, wg.PREFILL_TILES, *SWAP_TILES, *GEMV_TILES]
TILE_IDS = ["decode", "prefill", "swap16", "swap8", "gemv", "gemv1"]


@pytest.mark.parametrize("decode", ["ptx", "alu"])
@pytest.mark.parametrize("trailing", [0, 7])
@pytest.mark.parametrize("tiles", TILES, ids=TILE_IDS)
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


@pytest.mark.parametrize("tiles", TILES, ids=TILE_IDS)
def test_compiled_w4a16_row_ids_gather_matches_gathered_rows(tiles):
    """`row_ids`: rows[row_ids[r]] loaded inside the kernel (PTX decoder on CUDA) against the
    kernel on the rows gathered in XLA."""
    rng = np.random.default_rng()
    w, _ = random_fp4_experts(rng, 16, 512, 512)
    check_row_ids_and_epilogue(wg.grouped_gemm, w, tiles, rng, 16, 512, 512, rows=300, m=1000, trailing=7)


@pytest.mark.parametrize("tiles", [dataclasses.replace(wg.DECODE_TILES, block_n=64),
                                   dataclasses.replace(wg.DECODE_TILES, block_m=8, swap_ab=True),
                                   TileConfig(8, 64, 256, num_warps=2, num_stages=3, swap_ab=True)],
                         ids=["mma", "swap8", "swap8-2warps"])
@pytest.mark.parametrize("one_multiply", [False, True], ids=["2mul", "1mul"])
def test_compiled_w4a16_k_major_codes_match_the_standard_layout(tiles, one_multiply):
    """K-major codes (`packed.Fp4WeightsKMajor`), with either PTX decoder, compiled: bit for bit the
    [K/2, N] codes' output with the two-multiply decoder, and the float32 reference, on a skewed
    routing (scales in ONE_MUL_SCALE_BYTES)."""
    rng = np.random.default_rng()
    g, k, n, m = 16, 512, 512, 300
    sizes = jnp.asarray(skewed_sizes(rng, m - 7, g))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    assert wg.one_multiply_fits(w)
    run = jax.jit(lambda a, b, s, one: wg.grouped_gemm(a, b, s, cfg=tiles, decode="ptx", one_multiply=one),
                  static_argnums=3)
    out = np.asarray(run(x, packed.to_k_major(w), sizes, one_multiply), np.float32)
    np.testing.assert_array_equal(out, np.asarray(run(x, w, sizes, False), np.float32))
    ref = grouped_reference(np.asarray(x, np.float32), dense, np.asarray(sizes))
    row_err = np.linalg.norm(out - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
    assert np.all(row_err[:m - 7] < 2e-2)


@pytest.mark.parametrize("tokens", [16, 64, 512, 1024], ids=["3rows", "12rows", "96rows", "192rows-dequant"])
def test_engine_moe_with_k_major_experts_matches_float32(tokens):
    """The engine's routed-expert call (`models.moe.routed_experts`: rows gathered by token, the
    w3 GEMM's SwiGLU epilogue, w2, unroute) through the seam's "pallas" backend with K-major
    experts (`--expert-layout kmajor`) at their default tiles, by rows per expert: swap-AB
    8x128x256 (3), 16x64x256 2 warps (12), PREFILL_TILES (96), the K-major `fp4_dequant` path
    (192): against float32 on the decoded weights, beside the [K/2, N] codes' call."""
    from atom_jax.models.moe import routed_experts

    rng = np.random.default_rng()
    e, d, i, topk, limit = 32, 512, 256, 6, 10.0
    ws = [random_fp4_experts(rng, e, *kn) for kn in ((d, i), (d, i), (i, d))]
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    idx = jnp.asarray(np.argsort(rng.random((tokens, e)), axis=1)[:, :topk], jnp.int32)
    wts = jnp.asarray(rng.uniform(0.1, 1.0, (tokens, topk)), jnp.float32)
    run = jax.jit(lambda *w: routed_experts(x, idx, wts, *w, limit, 0, "pallas", e))
    with jax.default_matmul_precision("highest"):  # float32, not TF32
        ref = np.asarray(routed_experts(x.astype(jnp.float32), idx, wts, *(jnp.asarray(dense) for _, dense in ws),
                                        limit, 0, "ragged_dot", e), np.float64)
    for k_major in (False, True):
        out = np.asarray(run(*(packed.to_k_major(w) if k_major else w for w, _ in ws)), np.float64)
        assert np.all(np.isfinite(out))
        row_err = np.linalg.norm(out - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
        assert np.all(row_err < 3e-2), (k_major, float(row_err.max()))  # bf16 h and output rounding
