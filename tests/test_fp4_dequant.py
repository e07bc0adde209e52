"""The streaming FP4 -> bf16 expert decode kernel (`kernels/fp4_dequant.py`, interpret mode on
CPU) against the jnp reference decode, and the seam's dequant path (decode kernel, then the bf16
Pallas kernel) forced on against the in-kernel W4A16 path, with row_ids and the SwiGLU epilogue."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import fp4_dequant as fd
from atom_jax.kernels import grouped_gemm, packed
from atom_jax.kernels.platform import lowering_for
from atom_jax.models.layers import swiglu_clamped

TRITON = "__gpu$xla.gpu.triton"


def random_packed(rng, e, k, n, lowest: int = 1):
    """Uniform code bytes (every e2m1 pair) and ue8m0 scales over the finite range from `lowest`
    up, the extremes 0 (value 0), `lowest` (1: 2**-126, e2m1 0.5 gives a subnormal) and 254
    (2**127: x6 overflows to inf) always present."""
    codes = rng.integers(0, 256, (e, k // 2, n)).astype(np.uint8)
    scales = rng.integers(lowest, 255, (e, k // packed.FP4_BLOCK, n)).astype(np.uint8)
    scales.reshape(-1)[:3] = [0, lowest, 254]
    return packed.Fp4Weights(jnp.asarray(codes), jnp.asarray(scales))


def test_decode_kernel_equals_reference_dequant_exactly():
    rng = np.random.default_rng()
    w = random_packed(rng, 3, 128, 64)
    out = fd.dequantize(w, fd.DequantTiles(block_k=64, block_n=32), interpret=True)  # grid 3 x 2 x 2
    ref = packed.fp4_dequantize(w, jnp.float32).astype(jnp.bfloat16)
    assert out.shape == (3, 128, 64) and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    km = packed.to_k_major(w)  # K-major codes (`--expert-layout kmajor`): the same values, both decoders
    np.testing.assert_array_equal(np.asarray(fd.dequantize(km, fd.DequantTiles(block_k=64, block_n=32), interpret=True)),
                                  np.asarray(out))
    np.testing.assert_array_equal(np.asarray(packed.fp4_dequantize(km, jnp.float32)), np.asarray(ref, np.float32))
    with pytest.raises(ValueError, match="multiples of block_k"):
        fd.dequantize(w, fd.DequantTiles(block_k=48), interpret=True)


def test_k_major_decode_writes_n_by_k_without_transpose_exactly():
    """`dequantize_k_major`: K-major codes -> [E, N, K] bf16, the reference decode's values with
    the last two axes swapped (every code pair, scales 0, subnormal and overflowing)."""
    w = random_packed(np.random.default_rng(), 3, 128, 64)
    ref = np.asarray(packed.fp4_dequantize(w, jnp.float32).astype(jnp.bfloat16), np.float32)
    out = fd.dequantize_k_major(packed.to_k_major(w), fd.DequantTiles(block_k=64, block_n=32), interpret=True)
    assert out.shape == (3, 64, 128) and out.dtype == jnp.bfloat16  # grid 3 x 2 x 2
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.swapaxes(ref, 1, 2))
    gathered = fd.dequantize_k_major(packed.to_k_major(w), fd.DequantTiles(64, 32, gather_codes=True), interpret=True)
    np.testing.assert_array_equal(np.asarray(gathered), np.asarray(out))  # code bytes read twice, not spread
    with pytest.raises(ValueError, match="K-major"):
        fd.dequantize_k_major(w, interpret=True)
    # block_k halved until it divides K: V4-Pro's down projection split 8 ways by intermediate
    # dim (K = 384) keeps the decode-then-bf16 path with K-major codes
    assert fd.k_major_block_sizes(384, 7168) == (128, 64) and fd.k_major_block_sizes(128, 64) == (128, 64)
    pro_down = packed.Fp4WeightsKMajor(jnp.zeros((2, 7168, 192), jnp.uint8), jnp.zeros((2, 12, 7168), jnp.uint8))
    assert grouped_gemm._dequant_path_fits(pro_down, 256.0)


def test_select_ptx_decode_matches_reference_and_alu_on_every_byte():
    """`dequantize_k_major`'s inline assembly (`_PTX_DECODE_SELECT`: per input its code byte, scale
    byte and select byte, 0xFF for the high nibble), run by the PTX interpreter on all 256 code
    bytes, each as an even and an odd input (and mixed parities within an instance), with scales
    2**-126 (0.5 gives a subnormal: rows 0, 260), 2**127 (x6 overflows to inf: rows 1, 284), 0
    and random between: the reference bf16 bits, bit for bit (signed zeros too); the ALU decoder's
    the same except that XLA on CPU flushes float32 subnormal products to zero (as
    `packed.fp4_dequantize` there)."""
    import ml_dtypes
    from test_w4a16 import E2M1, _run_ptx, _word

    from atom_jax.kernels import w4a16_grouped_gemm as wg
    rng = np.random.default_rng()
    codes = np.tile(np.arange(256, dtype=np.uint8).reshape(64, 4), (8, 1))
    odd = np.concatenate([np.zeros((256, 4), np.uint8), np.full((256, 4), 0xFF, np.uint8)])
    odd[[7, 300]] = [[0, 0xFF, 0xFF, 0], [0xFF, 0, 0, 0xFF]]
    odd[8:256] = np.where(rng.integers(0, 2, (248, 4)) == 1, 0xFF, 0)  # mixed parities
    s = rng.integers(0, 255, codes.shape).astype(np.uint8)
    s[[0, 1, 2, 4, 284, 258, 260]] = [[1], [254], [0], [1], [254], [0], [1]]
    regs = _run_ptx(wg._PTX_DECODE_SELECT, {"$2": _word(codes), "$3": _word(s), "$4": _word(odd)})
    ptx = np.stack([regs[f"${i}"] >> sh & 0xFFFF for i in (0, 1) for sh in (0, 16)], 1)
    nibble = np.where(odd != 0, codes >> 4, codes & 0xF)
    scale = np.where(s == 0, 0.0, 2.0 ** (s.astype(np.float64) - 127))
    with np.errstate(over="ignore"):
        want = (E2M1[nibble] * scale).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(ptx, want)
    assert (want[0, 1], want[260, 0], want[1, 3], want[284, 0]) == (0x0040, 0x0040, 0x7F80, 0x7F80)  # subnormals, inf
    alu = np.asarray(wg._decode_alu_select(jnp.asarray(codes), jnp.asarray(s), jnp.asarray(odd))).view(np.uint16)
    assert np.all((alu == want) | (((want & 0x7F80) == 0) & (alu == want & 0x8000)))  # a subnormal: its signed zero


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_k_major_decode_lowers_for_gpu_at_flash_shapes(platform):
    """`dequantize_k_major` at the V4-Flash up and down projections' expert shapes (128 experts):
    one Triton call writing the bf16 [E, N, K] output itself (the PTX decoder on cuda, the ALU one
    on rocm), nothing after it in XLA (no transpose, no bitcast: XLA's GPU pipeline expands a
    bitcast between widths into a copy)."""
    from atom_jax.bench.gemm import SHAPES
    gather = fd.DequantTiles(512, 64, gather_codes=True)
    for shape, tiles in (("flash_up", None), ("flash_down", None), ("flash_up", gather)):
        e, k, n = SHAPES[shape]
        args = (jax.ShapeDtypeStruct((e, n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((e, k // 32, n), jnp.uint8))
        f = jax.jit(lambda c, s, t=tiles: fd.dequantize_k_major(packed.Fp4WeightsKMajor(c, s), t))
        with lowering_for(platform):
            exp = jax.export.export(f, platforms=(platform,), disabled_checks=[
                jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
        text = exp.mlir_module()
        assert exp.out_avals[0].shape == (e, n, k) and exp.out_avals[0].dtype == jnp.bfloat16
        assert text.count(TRITON) == 1 and "fp4_dequant_kmajor" in text
        assert "stablehlo.transpose" not in text and "stablehlo.bitcast_convert" not in text
        assert f"-> tensor<{e}x{n}x{k}xbf16>" in text


def check_seam_paths(monkeypatch, g, k, n, r, m, trailing, jit=False, k_major=False):
    """The seam as the MoE's w3 GEMM runs it (rows gathered by row_ids, the SwiGLU epilogue,
    rows past the groups unwritten) on a skewed routing: the in-kernel W4A16 path, then the
    dequant path forced (threshold 0), both against float64 on the same exact weights and each
    other (float32 accumulate; the difference is bf16 output rounding). `k_major`: the experts
    as `packed.Fp4WeightsKMajor` (the K-major default tiles, the decode kernel's K-major tiles)."""
    rng = np.random.default_rng()
    sizes = jnp.asarray(skewed_sizes(rng, m - trailing, g))
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    gate = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    w = packed.to_k_major(w) if k_major else w
    swiglu = functools.partial(swiglu_clamped, limit=2.0)

    def call(*args):
        fn = lambda a, b, s, i, gt: grouped_gemm.get("pallas")(  # noqa: E731
            a, b, s, row_ids=i, zero_tail=False, epilogue=(swiglu, gt))
        return np.asarray((jax.jit(fn) if jit else fn)(*args), np.float32)[:m - trailing]

    in_kernel = call(x, w, sizes, ids, gate)
    calls = []
    name = "dequantize_k_major" if k_major and grouped_gemm.KMAJOR_DECODE_TO_NK else "dequantize"
    real = getattr(fd, name)
    monkeypatch.setattr(fd, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    via_bf16 = call(x, w, sizes, ids, gate)
    assert calls, "the forced threshold must take the dequant path"
    ref = grouped_reference(np.asarray(x, np.float32)[np.asarray(ids)], dense, np.asarray(sizes))
    want = np.asarray(swiglu(gate.astype(jnp.float32), jnp.asarray(ref, jnp.float32)))[:m - trailing]
    tol = 2e-2 * np.abs(want).max()
    np.testing.assert_allclose(in_kernel, want, rtol=2e-2, atol=tol)
    np.testing.assert_allclose(via_bf16, want, rtol=2e-2, atol=tol)
    np.testing.assert_allclose(via_bf16, in_kernel, rtol=2e-2, atol=tol)


@pytest.mark.parametrize("k_major,to_nk", [(False, False), (True, False), (True, True)],
                         ids=["nmajor", "kmajor", "kmajor-to-nk"])
def test_seam_dequant_path_matches_w4a16_path(monkeypatch, k_major, to_nk):
    """kmajor-to-nk: K-major codes decoded to [E, N, K] (KMAJOR_DECODE_TO_NK), the bf16 kernel's transpose_b."""
    monkeypatch.setattr(grouped_gemm, "KMAJOR_DECODE_TO_NK", to_nk)
    check_seam_paths(monkeypatch, g=4, k=64, n=32, r=20, m=50, trailing=5, k_major=k_major)


@pytest.mark.parametrize("platform,k_major,to_nk", [("cuda", False, False), ("rocm", False, False), ("cuda", True, False),
                                                   ("rocm", True, False), ("cuda", True, True)],
                         ids=["cuda", "rocm", "cuda-kmajor", "rocm-kmajor", "cuda-kmajor-to-nk"])
def test_seam_dequant_path_lowers_for_gpu(platform, k_major, to_nk, monkeypatch):
    """The decode kernel and the bf16 kernel after it lower as Triton calls (jax.export on CPU;
    the GPU compile is the GPU test's); K-major codes too, by either decode (KMAJOR_DECODE_TO_NK)."""
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    monkeypatch.setattr(grouped_gemm, "KMAJOR_DECODE_TO_NK", to_nk)
    g, k, n, m = 4, 256, 512, 64

    def f(x, c, s, sizes):
        return grouped_gemm.get("pallas")(x, packed.fp4_weights(c, s, k_major), sizes)

    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((g, n, k // 2) if k_major else (g, k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((g, k // 32, n), jnp.uint8), jax.ShapeDtypeStruct((g,), jnp.int32))
    with lowering_for(platform):
        text = jax.export.export(jax.jit(f), platforms=(platform,), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
    # two Triton calls (the in-kernel W4A16 path is one) and no XLA transpose between them; the
    # no-transpose K-major decode only where chosen
    assert text.count(TRITON) == 2 and "fp4_dequant" in text
    assert ("fp4_dequant_kmajor" in text) == to_nk and "stablehlo.transpose" not in text


def test_seam_keeps_the_w4a16_kernel_where_the_dequant_path_does_not_fit(monkeypatch):
    """Threshold forced on, N = 384 (V4-Pro's intermediate size split 8 ways by intermediate
    dim): the decode kernel's 512-wide tile is capped to 384, not a power of two (Triton rejects
    it), and the bf16 kernel's 256-wide tile does not divide it; the W4A16 kernel (128-wide)
    does, and the seam must take it instead of failing."""
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    assert grouped_gemm._dequant_path_fits(packed.Fp4Weights(jnp.zeros((2, 2048, 512), jnp.uint8),
                                                             jnp.zeros((2, 128, 512), jnp.uint8)), 64)
    with pytest.raises(ValueError, match="powers of two"):
        fd.block_sizes(64, 384)
    rng = np.random.default_rng()
    g, k, n, m = 2, 64, 384, 24
    sizes = jnp.asarray([9, m - 9], jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w, dense = random_fp4_experts(rng, g, k, n)
    out = grouped_gemm.get("pallas")(x, w, sizes)
    ref = grouped_reference(np.asarray(x), dense, np.asarray(sizes))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prefill_sweep_tiles_fit_the_prefill_shapes():
    """`bench w4a16 --prefill-sweep`: at most 8 distinct bf16-kernel tiles, each dividing the
    V4-Flash and V4-Pro up/down shapes' K and N and within Hopper's shared memory (A and B tiles
    x stages); the decode and W4A16 tiles divide them too."""
    from atom_jax.bench.gemm import SHAPES
    from atom_jax.bench.w4a16_prefill import DECODE_TILES, GEMM_TILES, W4A16_TILES
    from atom_jax.kernels import pallas_grouped_gemm as pg
    assert len(set(GEMM_TILES)) == len(GEMM_TILES) <= 8 and fd.KMAJOR_TILES == fd.DequantTiles(*DECODE_TILES[0])
    for shape in ("flash_up", "flash_down", "pro_up"):
        _, k, n = SHAPES[shape]
        for bm, bn, bk, _, stages in GEMM_TILES:
            assert pg.block_sizes(k, n, pg.TileConfig(bm, bn, bk)) == (bk, bn)
            assert (bm + bn) * bk * 2 * stages <= 227 * 1024
        for t in DECODE_TILES:
            assert fd.block_sizes(k, n, fd.DequantTiles(*t)) == t[:2]
        for _, bn, bk, _, _ in W4A16_TILES:  # the W4A16 kernel's: whole scale groups per K step
            assert k % bk == 0 and bk % packed.FP4_BLOCK == 0 and n % bn == 0


def test_prefill_sweep_runs_and_checks_every_candidate():
    """`bench w4a16 --prefill-sweep` on a tiny shape (interpret mode): every candidate compiled,
    checked against the default tiles' output and timed; the seam's path row (decode + best)."""
    import argparse

    from atom_jax.bench.w4a16 import CHECK_TOL
    from atom_jax.bench.w4a16_prefill import prefill_sweep
    out = {}
    prefill_sweep(argparse.Namespace(tiny=True, iters=1, json=None), {"tiny_up": (4, 128, 128)}, [32],
                  {"copy_GBps": None}, out, True, lambda *a: None)
    kernels = [r["kernel"] for r in out["prefill_sweep"]]
    assert kernels.count("bf16_transpose_b") == 2 and "w4a16_kmajor" in kernels and "path" in kernels
    assert all("error" not in r and r.get("check_err", 0) < CHECK_TOL for r in out["prefill_sweep"])
    assert [r["tiles"]["block_k"] for r in out["prefill_decode_sweep"] if "ms" in r] == [64]
