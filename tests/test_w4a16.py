"""Packed FP4 / FP8 decoding against the numpy checkpoint decoders, and the W4A16 grouped GEMM
(interpret mode on CPU) against a float64 reference on the dequantised weights, with fresh
skewed routings: empty groups, one group holding most rows, rows in no group."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from grouped_reference import grouped_reference

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import grouped_gemm, packed
from atom_jax.kernels import w4a16_grouped_gemm as wg
from atom_jax.kernels.pallas_grouped_gemm import TileConfig
from atom_jax.weights import quant

SMALL = TileConfig(block_m=16, block_n=32, block_k=64)


def random_fp4_experts(rng, g, k, n):
    """Random FP4 expert stack in our layout (as the loader builds it from [out, in/2] tensors)
    and its float32 dequantisation [g, k, n] by the checkpoint decoder."""
    codes, scales, dense = [], [], []
    for _ in range(g):
        w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 4.0)
        q, s = quant.quantize_fp4(w)  # [n, k/2] int8, [n, k/32] e8m0
        codes.append(q.view(np.uint8).T)
        scales.append(s.view(np.uint8).T)
        dense.append(quant.dequantize_fp4(q, s).T)
    return packed.Fp4Weights(jnp.asarray(np.stack(codes)), jnp.asarray(np.stack(scales))), np.stack(dense)


def test_fp4_decode_matches_checkpoint_decoder_on_every_byte():
    rng = np.random.default_rng()
    n, k = 8, 512  # all 256 byte values, random scales around 1
    codes = np.tile(np.arange(256, dtype=np.uint8), (n, 1))
    scales = rng.integers(120, 135, size=(n, k // 32)).astype(np.uint8)
    ref = quant.dequantize_fp4(codes, scales.view(ml_dtypes.float8_e8m0fnu))  # [n, k]
    ours = packed.fp4_dequantize(packed.Fp4Weights(jnp.asarray(codes.T), jnp.asarray(scales.T)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours), ref.T)


def test_fp8_dequantize_matches_checkpoint_decoder():
    rng = np.random.default_rng()
    w = rng.standard_normal((200, 300)).astype(np.float32)
    q, s = quant.quantize_fp8(w)
    ref = quant.dequantize_fp8(q, s)
    ours = packed.fp8_dequantize(jnp.asarray(q.view(np.uint8)), jnp.asarray(quant.scale_to_float32(s)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    y = packed.fp8_linear(jnp.asarray(x), jnp.asarray(q.view(np.uint8)), jnp.asarray(quant.scale_to_float32(s)))
    want = x @ ref.T  # float32 sums of 300 products: rounding grows with the largest output
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("trial", range(2))
def test_w4a16_kernel_matches_float64_reference(trial):
    rng = np.random.default_rng()
    g, k, n = 6, 128, 64
    m = int(rng.integers(40, 110))
    sizes = skewed_sizes(rng, m - int(rng.integers(0, 9)), g)  # empty groups, one large, a few rows in none
    rows = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    out = wg.grouped_gemm(rows, w, jnp.asarray(sizes), cfg=SMALL, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = grouped_reference(np.asarray(rows, np.float32), dense, sizes)
    out = np.asarray(out, np.float64)
    # decoded weights are exact in bf16; float32 accumulate; error = bf16 output rounding
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 8e-3
    assert np.all(out[sizes.sum():] == 0)


def test_w4a16_swap_ab_matches_float64_reference():
    """The swap-AB variant (out^T = W^T . A^T per K step, 8-row tiles), interpreted, as the MoE
    calls it: rows gathered in the kernel (row_ids), the SwiGLU epilogue, zero tail; a skewed
    routing (empty groups, one group holding most rows, group sizes off the 8-row grid)."""
    rng = np.random.default_rng()
    g, r = 6, 30
    m = int(rng.integers(60, 100))
    sizes = skewed_sizes(rng, m - int(rng.integers(1, 9)), g)
    small = np.argmin(sizes)  # its rows to the largest group: at least one empty group (skewed_sizes may have none)
    sizes[np.argmax(sizes)] += sizes[small]
    sizes[small] = 0
    assert sizes.max() > m // 2
    _check_as_the_moe_calls_it(rng, sizes, m, TileConfig(block_m=8, block_n=32, block_k=64, swap_ab=True), g=g, r=r)


def _check_as_the_moe_calls_it(rng, sizes, m: int, cfg: TileConfig, g: int, r: int, k: int = 128, n: int = 64,
                               k_major: bool = False, one_multiply: bool = False):
    """The kernel at `cfg`, interpreted, with rows gathered in the kernel (row_ids into r rows),
    the SwiGLU epilogue and the zero tail, against float64 on the decoded weights. `k_major`:
    the weights as `packed.Fp4WeightsKMajor`; `one_multiply`: the one-multiply decoder; either
    way the output bit for bit that of the plain call."""
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = rng.integers(0, r, m).astype(np.int32)
    gate = jnp.asarray(rng.standard_normal((m, n)) * 2, jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    epi = (lambda gt, up: jax.nn.silu(gt) * up, gate)
    run = functools.partial(wg.grouped_gemm, x, group_sizes=jnp.asarray(sizes), cfg=cfg, interpret=True,
                            row_ids=jnp.asarray(ids), epilogue=epi)
    out = run(packed.to_k_major(w) if k_major else w, one_multiply=one_multiply)
    if k_major or one_multiply:
        assert wg.one_multiply_fits(w) or not one_multiply
        np.testing.assert_array_equal(np.asarray(out), np.asarray(run(w)))
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    up = grouped_reference(np.asarray(x, np.float64)[ids], dense, sizes)
    gt = np.asarray(gate, np.float64)
    ref = gt / (1 + np.exp(-gt)) * up
    valid = sizes.sum()
    out = np.asarray(out, np.float64)
    row_err = np.linalg.norm(out[:valid] - ref[:valid], axis=1) / (np.linalg.norm(ref[:valid], axis=1) + 1e-6)
    assert np.all(row_err < 2e-2)  # bf16 output rounding, every row
    assert np.all(out[valid:] == 0)


@pytest.mark.parametrize("swap,k_major,one_multiply", [(False, True, False), (True, True, False),
                                                       (False, False, True), (True, True, True)],
                         ids=["mma-kmajor", "swap-kmajor", "mma-1mul", "swap-kmajor-1mul"])
def test_w4a16_k_major_codes_and_one_multiply_match_float64_and_the_plain_kernel(swap, k_major, one_multiply):
    """K-major codes (`packed.Fp4WeightsKMajor`) and the one-multiply decoder, interpreted, as the
    MoE calls the kernel, on a skewed routing: float64 on the decoded weights, and bit for bit the
    output of the [K/2, N] codes with the two-multiply decoder."""
    rng = np.random.default_rng()
    sizes = skewed_sizes(rng, int(rng.integers(30, 50)), 5)
    m = int(sizes.sum()) + int(rng.integers(1, 6))
    cfg = TileConfig(block_m=8 if swap else 16, block_n=32, block_k=64, swap_ab=swap)
    _check_as_the_moe_calls_it(rng, sizes, m, cfg, g=5, r=20, k_major=k_major, one_multiply=one_multiply)


def test_k_major_default_tiles_are_the_measured_mma_ones():
    """K-major codes never get GEMV tiles (MMA only); decode sizes get the H200's measured bests
    (swap-AB 8x128x256 4w at ~3 rows per expert, 16x64x256 2w at ~12), prefill PREFILL_TILES."""
    for rows in (0.5, 3, 5.9, 6, 12, 31.9, 32, 512):
        t = wg.default_tiles(rows, k_major=True)
        assert not t.gemv
        assert t == (wg.PREFILL_TILES if rows >= 32 else wg.KMAJOR_DECODE_TILES_SMALL if rows < 6
                     else wg.KMAJOR_DECODE_TILES)
    assert wg.KMAJOR_DECODE_TILES_SMALL == TileConfig(8, 128, 256, 4, 3, swap_ab=True)
    assert wg.KMAJOR_DECODE_TILES == TileConfig(16, 64, 256, 2, 3, swap_ab=True)
    assert wg.default_tiles(3) == wg.default_tiles(3, k_major=False)  # [K/2, N] codes: unchanged


def test_k_major_round_trip_and_shape():
    w, _ = random_fp4_experts(np.random.default_rng(), 3, 64, 32)
    km = packed.to_k_major(w)
    assert km.codes.shape == (3, 32, 32) and km.shape == w.shape == (3, 64, 32)
    np.testing.assert_array_equal(np.asarray(packed.from_k_major(km).codes), np.asarray(w.codes))


@pytest.mark.parametrize("stages", [1, 2], ids=["plain", "prefetch"])
def test_w4a16_gemv_matches_float64_reference(stages):
    """The GEMV variant (no MMA: float32 FMAs, 4-row work items), interpreted, as the MoE calls
    it (rows gathered in the kernel, the SwiGLU epilogue, zero tail), with and without the
    register prefetch: empty groups, one group of more than 16 rows (several work items),
    group sizes off the 4-row grid, rows in no group."""
    rng = np.random.default_rng()
    sizes = skewed_sizes(rng, int(rng.integers(30, 45)), 5)
    sizes[np.argmin(sizes)] = 0
    sizes[np.argmax(sizes)] = max(sizes.max(), 17 + int(rng.integers(0, 4)))
    m = int(sizes.sum()) + int(rng.integers(1, 6))
    cfg = TileConfig(block_m=4, block_n=32, block_k=64, num_stages=stages, gemv=True)
    _check_as_the_moe_calls_it(rng, sizes, m, cfg, g=5, r=20)


def test_gemv_tiles_refused_where_they_do_not_apply():
    w, _ = random_fp4_experts(np.random.default_rng(), 2, 64, 32)
    x, sizes = jnp.zeros((8, 64), jnp.bfloat16), jnp.asarray([4, 4])
    with pytest.raises(ValueError, match="block_m <= 16"):
        wg.grouped_gemm(x, w, sizes, cfg=TileConfig(block_m=32, block_n=32, block_k=64, gemv=True), interpret=True)
    with pytest.raises(ValueError, match="swap_ab"):
        wg.grouped_gemm(x, w, sizes, cfg=TileConfig(block_m=8, block_n=32, block_k=64, swap_ab=True, gemv=True),
                        interpret=True)
    with pytest.raises(ValueError, match="K-major"):
        wg.grouped_gemm(x, packed.to_k_major(w), sizes, cfg=TileConfig(block_m=4, block_n=32, block_k=64, gemv=True),
                        interpret=True)


def test_seam_runs_packed_weights_on_every_cpu_backend():
    """Packed weights through the seam: the Pallas name runs the W4A16 kernel (interpreted),
    the others decode in jnp then run their bf16 path; all agree."""
    rng = np.random.default_rng()
    g, k, n, m = 4, 64, 32, 50
    sizes = jnp.asarray(skewed_sizes(rng, m - 3, g))
    rows = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    ref = np.asarray(grouped_gemm.get("dense")(rows, jnp.asarray(dense, jnp.bfloat16), sizes), np.float32)
    for name in ("ragged_dot", "pallas", "auto", "capacity_dropless"):
        out = np.asarray(grouped_gemm.get(name)(rows, w, sizes, mean_group=m / g), np.float32)
        np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max(), err_msg=name)


SWAP_TILES = TileConfig(block_m=8, block_n=128, block_k=256, swap_ab=True)
# A K-major candidate of the decode sweep (`bench w4a16 --variants w4a16_kmajor`).
KMAJOR_TILES = TileConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=3)


@pytest.mark.parametrize("variant", [
    ("cuda", False, None, wg.DECODE_TILES), ("cuda", True, None, wg.DECODE_TILES),
    ("rocm", False, None, wg.DECODE_TILES), ("rocm", True, None, wg.DECODE_TILES),
    ("cuda", True, None, SWAP_TILES), ("cuda", True, "alu", SWAP_TILES), ("rocm", True, None, SWAP_TILES),
    ("cuda", True, None, wg.GEMV_TILES), ("rocm", True, None, wg.GEMV_TILES),
    ("cuda", True, None, KMAJOR_TILES, True), ("rocm", True, None, KMAJOR_TILES, True),
    ("cuda", True, None, TileConfig(8, 64, 256, num_warps=2, num_stages=3, swap_ab=True), True),
    ("cuda", True, None, wg.DECODE_TILES, False, True),
    ("cuda", True, None, TileConfig(8, 64, 256, num_warps=2, num_stages=3, swap_ab=True), True, True)],
    ids=["cuda", "cuda-moe", "rocm", "rocm-moe", "cuda-moe-swap", "cuda-moe-swap-alu", "rocm-moe-swap",
         "cuda-moe-gemv", "rocm-moe-gemv", "cuda-moe-kmajor", "rocm-moe-kmajor", "cuda-moe-swap-kmajor",
         "cuda-moe-1mul", "cuda-moe-swap-kmajor-1mul"])
def test_w4a16_kernel_lowers_for_gpu(variant):
    """The Triton lowering runs on CPU through jax.export (the GPU compile itself is the GPU test's);
    `moe`: as the MoE's w3 GEMM calls it (rows gathered in the kernel, the SwiGLU epilogue); the
    swap-AB variant with the platform's decoder (ptx on cuda, alu on rocm) and alu on cuda; the
    GEMV variant with the platform's decoder."""
    platform, moe, decode, tiles, k_major, one_multiply = (*variant, False, False)[:6]
    weights = packed.Fp4WeightsKMajor if k_major else packed.Fp4Weights

    def f(x, c, s, sizes):
        if not moe:
            return wg.grouped_gemm(x, weights(c, s), sizes, cfg=tiles, decode=decode)
        ids = jnp.arange(m, dtype=jnp.int32) % 8
        epi = (lambda gate, up: jax.nn.silu(gate) * up, x[:, :n])
        return wg.grouped_gemm(x, weights(c, s), sizes, cfg=tiles, decode=decode, row_ids=ids,
                               zero_tail=False, epilogue=epi, one_multiply=one_multiply)

    g, k, n, m = 4, 512, 512, 64
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((g, n, k // 2) if k_major else (g, k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((g, k // 32, n), jnp.uint8), jax.ShapeDtypeStruct((g,), jnp.int32))
    exported = jax.export.export(jax.jit(f), platforms=(platform,), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert ("w4a16_grouped_gemm_swap" in exported.mlir_module()) == tiles.swap_ab
    assert ("w4a16_grouped_gemm_gemv" in exported.mlir_module()) == tiles.gemv
    assert "w4a16_grouped_gemm" in exported.mlir_module()


E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def _word(b):  # [rows, 4] uint8 -> one little-endian uint32 per row
    return (b.astype(np.uint32) << np.arange(0, 32, 8, dtype=np.uint32)).sum(1).astype(np.uint32)


def _check_bf16_decoder(template: str, codes, sc_bits, scale):
    """An MMA decoder's inline assembly (four code bytes in $2, bf16 scale pairs in $3/$4, bf16x2
    out in $0/$1) by the PTX interpreter: each half exactly e2m1(nibble) * scale, signed zeros too."""
    for half, nibble in (("even", codes & 0xF), ("odd", codes >> 4)):
        regs = _run_ptx(wg.half_asm(template, half), {"$2": _word(codes), "$3": sc_bits[:, 0] | sc_bits[:, 1] << 16,
                                                      "$4": sc_bits[:, 2] | sc_bits[:, 3] << 16})
        got = np.stack([(regs[f"${i}"] >> sh & 0xFFFF).astype(np.uint16).view(ml_dtypes.bfloat16)
                        for i in (0, 1) for sh in (0, 16)], 1).astype(np.float64)
        want = E2M1[nibble] * scale
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))  # -0 where the code's sign is set


def _every_code_byte():
    """All 256 code bytes [64, 4], fresh random ue8m0 scale bytes 0..227 (row 0: s = 0) and their
    float64 scales (2**(s - 127), s = 0 -> 0)."""
    codes = np.arange(256, dtype=np.uint8).reshape(64, 4)
    s = np.random.default_rng().integers(0, 228, size=(64, 4)).astype(np.uint8)
    s[0] = 0
    return codes, s, np.where(s == 0, 0.0, 2.0 ** (s.astype(np.float64) - 127))


def test_ptx_decode_bit_logic_matches_checkpoint_decoder_on_every_byte():
    """The MMA kernels' inline assembly (`_PTX_DECODE`: bf16 scales in, bf16x2 out), run by a PTX
    interpreter on all 256 code bytes with scales 2**-127 (s = 0 gives 0) to 2**100: the
    checkpoint decoder's values exactly, for the even (low nibble) and odd (high nibble) inputs."""
    codes, s, scale = _every_code_byte()
    _check_bf16_decoder(wg._PTX_DECODE, codes, s.astype(np.uint32) << 7, scale)  # bf16 bits of 2**(s - 127)


def _run_ptx(asm: str, operands: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """numpy interpreter of the few PTX instructions the decoders use, on uint32 words (one per
    array element): mov, prmt (byte select), shl, and, lop3 (any truth table) and fma.rn.bf16x2
    (each lane in float64, rounded once to bf16 as the hardware does). Returns the registers."""
    regs = {k: v.astype(np.uint32) for k, v in operands.items()}
    n = next(iter(regs.values())).shape

    def val(tok):
        return regs[tok] if tok in regs else np.full(n, int(tok, 0) & 0xFFFFFFFF, np.uint32)

    def bf16_lanes(w):
        return [((w >> sh) & 0xFFFF).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64) for sh in (0, 16)]

    for stmt in asm.replace("{", ";").replace("}", ";").replace("\n", ";").split(";"):
        if not stmt.strip() or stmt.strip().startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        x = [val(a) for a in src]
        if op == "mov.b32":
            out = x[0]
        elif op == "prmt.b32":
            pool = [(x[0] >> (8 * i)) & 0xFF for i in range(4)] + [(x[1] >> (8 * i)) & 0xFF for i in range(4)]
            sel = int(src[2], 0)
            byte = [pool[(sel >> (4 * i)) & 7] for i in range(4)]  # selector bit 3: the byte's top bit replicated
            byte = [np.where(b & 0x80, 0xFF, 0) if (sel >> (4 * i)) & 8 else b for i, b in enumerate(byte)]
            out = sum((b.astype(np.uint32) & 0xFF) << (8 * i) for i, b in enumerate(byte))
        elif op == "shl.b32":
            out = (x[0].astype(np.uint64) << int(src[1], 0)).astype(np.uint32)
        elif op == "and.b32":
            out = x[0] & x[1]
        elif op == "lop3.b32":
            lut, out = int(src[3], 0), np.zeros(n, np.uint32)
            for bit in range(32):
                idx = (((x[0] >> bit) & 1) << 2) | (((x[1] >> bit) & 1) << 1) | ((x[2] >> bit) & 1)
                out |= ((lut >> idx) & 1).astype(np.uint32) << bit
        elif op == "fma.rn.bf16x2":
            lanes = [a * b + c for a, b, c in zip(*map(bf16_lanes, x))]
            out = sum(lane.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32) << sh
                      for lane, sh in zip(lanes, (0, 16)))
        else:
            raise AssertionError(f"instruction {op} not modelled")
        regs[dst] = np.asarray(out, np.uint32)
    return regs


def test_one_multiply_ptx_decode_matches_checkpoint_decoder_over_its_scales():
    """The one-multiply inline assembly (`_PTX_DECODE_1MUL`, scales from `_one_mul_scales`), run
    by the PTX interpreter on all 256 code bytes and every scale byte of ONE_MUL_SCALE_BYTES: the
    checkpoint decoder's values times 2**-ONE_MUL_SHIFT exactly (signed zeros included)."""
    lo, hi = wg.ONE_MUL_SCALE_BYTES
    codes = np.tile(np.arange(256, dtype=np.uint8).reshape(64, 4), (hi - lo + 1, 1))
    s = np.repeat(np.arange(lo, hi + 1, dtype=np.uint8), 64)[:, None].repeat(4, 1)
    sc = np.asarray(wg._one_mul_scales(jnp.asarray(s))).view(np.uint16).astype(np.uint32)
    _check_bf16_decoder(wg._PTX_DECODE_1MUL, codes, sc, 2.0 ** (s.astype(np.float64) - 127 - wg.ONE_MUL_SHIFT))


def test_gemv_ptx_decode_matches_checkpoint_decoder_on_every_byte():
    """The GEMV's inline assembly (`_PTX_DECODE_F32`: scale bytes in, float32 out), run by a PTX
    interpreter on all 256 code bytes with scales 2**-127 (s = 0 gives 0) to 2**100: the
    checkpoint decoder's values exactly, for the even (low nibble) and odd (high nibble) inputs."""
    codes, s, scale = _every_code_byte()
    for half, nibble in (("even", codes & 0xF), ("odd", codes >> 4)):
        regs = _run_ptx(wg.half_asm(wg._PTX_DECODE_F32, half), {"$4": _word(codes), "$5": _word(s)})
        got = np.stack([regs[f"${i}"].view(np.float32) for i in range(4)], 1)
        np.testing.assert_array_equal(got, E2M1[nibble] * scale)


def test_ptx_decoder_refused_in_interpret_mode():
    w, _ = random_fp4_experts(np.random.default_rng(), 2, 64, 32)
    with pytest.raises(ValueError, match="ptx"):
        wg.grouped_gemm(jnp.zeros((8, 64), jnp.bfloat16), w, jnp.asarray([4, 4]), cfg=SMALL,
                        interpret=True, decode="ptx")


def test_decode_sweep_tiles_fit_every_expert_shape():
    """`bench w4a16 --decode-sweep`: at most 24 distinct configs per variant, all three variants
    (the swapped one with 8- and 16-row tiles, the GEMV one with at most GEMV_MAX_BLOCK_M rows),
    `--variants` picking some, each tile dividing K (in whole FP4 scale groups) and N of every shape."""
    from atom_jax.bench.gemm import SHAPES
    from atom_jax.bench.w4a16 import VARIANTS, decode_sweep_tiles, variant
    tiles = decode_sweep_tiles()
    assert len(set(tiles)) == len(tiles)
    by_variant = {v: [t for t in tiles if variant(t) == v] for v in VARIANTS}
    assert all(0 < len(ts) <= 24 for ts in by_variant.values())
    assert decode_sweep_tiles(("w4a16_gemv",)) == by_variant["w4a16_gemv"]
    assert {t.block_m for t in by_variant["w4a16_swap"]} == {8, 16}
    assert max(t.block_m for t in by_variant["w4a16_gemv"]) <= wg.GEMV_MAX_BLOCK_M
    from atom_jax.bench.w4a16 import kmajor_tiles, one_mul_tiles
    tiles += kmajor_tiles() + [t for t, _ in one_mul_tiles()] + [wg.KMAJOR_DECODE_TILES, wg.KMAJOR_DECODE_TILES_SMALL]
    assert not any(t.gemv for t in kmajor_tiles() + [t for t, _ in one_mul_tiles()])  # MMA tiles only
    for _, k, n in SHAPES.values():
        assert all(k % t.block_k == 0 and t.block_k % packed.FP4_BLOCK == 0 and n % t.block_n == 0 for t in tiles)


def test_swap_ab_refused_by_the_bf16_kernel():
    from atom_jax.kernels import pallas_grouped_gemm as pg
    with pytest.raises(ValueError, match="swap_ab"):
        pg.grouped_gemm(jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((2, 64, 32), jnp.bfloat16), jnp.asarray([4, 4]),
                        cfg=TileConfig(block_m=16, block_n=32, block_k=64, swap_ab=True), interpret=True)


def test_fp8_kernel_matches_float64_reference():
    """The FP8 block-scaled dense kernel (interpreted): rows not a multiple of the row tile,
    several 128x128 scale blocks with different scales."""
    from atom_jax.kernels import fp8_dense_gemm as fk
    rng = np.random.default_rng()
    w = rng.standard_normal((256, 384)).astype(np.float32) * np.repeat(rng.uniform(0.01, 9, (2, 3)), 128, 0).repeat(128, 1)
    q, s = quant.quantize_fp8(w)
    codes, scale = jnp.asarray(q.view(np.uint8)), jnp.asarray(quant.scale_to_float32(s))
    x = jnp.asarray(rng.standard_normal((3, 13, 384)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ quant.dequantize_fp8(q, s).T.astype(np.float64)
    out = packed.fp8_linear(x, codes, scale, use_kernel=True)
    assert out.shape == (3, 13, 256) and out.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 8e-3
    with pytest.raises(ValueError, match="multiples of 128"):
        fk.fp8_matmul(x[0, :, :100], codes[:, :100], scale)


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_fp8_kernel_lowers_for_gpu(platform):
    from atom_jax.kernels import fp8_dense_gemm as fk
    args = (jax.ShapeDtypeStruct((64, 512), jnp.bfloat16), jax.ShapeDtypeStruct((256, 512), jnp.uint8),
            jax.ShapeDtypeStruct((2, 4), jnp.float32))
    exported = jax.export.export(jax.jit(fk.fp8_matmul), platforms=(platform,), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "fp8_dense_gemm" in exported.mlir_module()


@pytest.mark.parametrize("out_per_group", [128, 48])  # whole scale blocks per group (kernel) or not
def test_fp8_grouped_linear_matches_float64(out_per_group):
    """wo_a's form: G weights stacked [G*out, in] with block scales over the stack."""
    rng = np.random.default_rng()
    g, k = 2, 256
    w = rng.standard_normal((g * out_per_group, k)).astype(np.float32)
    q, s = quant.quantize_fp8(w)
    dense = quant.dequantize_fp8(q, s).reshape(g, out_per_group, k).astype(np.float64)
    x = jnp.asarray(rng.standard_normal((3, 5, g, k)), jnp.float32)
    # 128 rows per group: the Pallas kernel (interpreted) under vmap over the groups
    out = packed.fp8_grouped_linear(x, jnp.asarray(q.view(np.uint8)), jnp.asarray(quant.scale_to_float32(s)), g,
                                    use_kernel=out_per_group % 128 == 0)
    ref = np.einsum("bsgi,goi->bsgo", np.asarray(x, np.float64), dense)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
