"""`grouped_gemm.DEQUANT_GEMM`: the bf16 backend the seam's dequant path (packed FP4 experts decoded
by the `fp4_dequant` kernel first) multiplies with, "pallas" or "mosaic" (Hopper only). On CPU and
any GPU but Hopper the choice falls back to the bf16 Pallas kernel with the same values; on Hopper
(simulated here: the Mosaic kernel has no CPU interpreter) it takes the Mosaic kernel where its
tiles fit, and the seam lowers to the decode kernel then the Mosaic kernel. The compiled Mosaic
path against float32 is `tests/test_fp4_dequant_gpu.py -k mosaic`."""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from test_w4a16 import random_fp4_experts

from atom_jax.kernels import grouped_gemm, packed
from atom_jax.kernels.platform import lowering_for
from atom_jax.models.layers import swiglu_clamped

SWIGLU = functools.partial(swiglu_clamped, limit=2.0)


def _packed(g, k, n, k_major=False):
    w = packed.Fp4Weights(jnp.zeros((g, k // 2, n), jnp.uint8), jnp.zeros((g, k // 32, n), jnp.uint8))
    return packed.to_k_major(w) if k_major else w


@pytest.fixture
def mosaic_dequant(monkeypatch):
    """DEQUANT_GEMM = "mosaic" and the dequant path at every rows-per-expert."""
    monkeypatch.setattr(grouped_gemm, "DEQUANT_GEMM", "mosaic")
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    return monkeypatch


@pytest.mark.parametrize("platform", [None, "cuda", "rocm"], ids=["cpu", "cuda-not-hopper", "rocm"])
def test_mosaic_dequant_gemm_falls_back_to_pallas_off_hopper(mosaic_dequant, platform):
    w = _packed(2, 256, 512)  # a shape the Mosaic kernel's tiles divide
    with lowering_for(platform) if platform else contextlib.nullcontext():
        assert not grouped_gemm.is_hopper()
        assert grouped_gemm.dequant_gemm(w) == "pallas"
        assert grouped_gemm._packed_path("pallas", w, 512.0) == ("dequant", "pallas")


def test_mosaic_dequant_gemm_on_cpu_gives_the_pallas_values(mosaic_dequant):
    """The MoE's w3 call (row_ids gathered, SwiGLU epilogue) with DEQUANT_GEMM = "mosaic" on CPU:
    exactly the values of DEQUANT_GEMM = "pallas" (the same interpreted kernels), and float32's
    within bf16 output rounding, on a routing with empty and large groups."""
    rng = np.random.default_rng()
    g, k, n, r, m = 3, 64, 256, 24, 40
    w, dense = random_fp4_experts(rng, g, k, n)
    sizes = jnp.asarray([0, 31, m - 31 - 4], jnp.int32)  # 4 rows in no group
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    gate = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)

    def call():
        return np.asarray(grouped_gemm.get("pallas")(x, w, sizes, row_ids=ids, zero_tail=False,
                                                     epilogue=(SWIGLU, gate)), np.float32)[:m - 4]

    got = call()
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_GEMM", "pallas")
    np.testing.assert_array_equal(got, call())
    ref = grouped_reference(np.asarray(x, np.float32)[np.asarray(ids)], dense, np.asarray(sizes))
    want = np.asarray(SWIGLU(gate.astype(jnp.float32), jnp.asarray(ref, jnp.float32)))[:m - 4]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_mosaic_dequant_gemm_on_hopper_where_its_tiles_fit(mosaic_dequant):
    """Hopper simulated: the Mosaic kernel for [E, K, N] decoded experts whose K and N its tiles
    divide (K-major codes through the transposing decode too); the Pallas kernel for N = 384 and
    for K-major codes decoded to [E, N, K] (KMAJOR_DECODE_TO_NK). The W4A16 kernel's rows per
    expert are untouched; the default stays "pallas"; an unknown name is refused."""
    mosaic_dequant.setattr(grouped_gemm, "is_hopper", lambda: True)
    fits, km = _packed(2, 256, 512), _packed(2, 256, 512, k_major=True)
    assert grouped_gemm.dequant_gemm(fits) == grouped_gemm.dequant_gemm(km) == "mosaic"
    assert grouped_gemm.dequant_gemm(_packed(2, 256, 384)) == "pallas"
    for name in ("pallas", "capacity_dropless", "mosaic", "tokamax"):
        assert grouped_gemm._packed_path(name, fits, 512.0) == ("dequant", "mosaic")
    mosaic_dequant.setattr(grouped_gemm, "KMAJOR_DECODE_TO_NK", True)
    assert grouped_gemm.dequant_gemm(km) == "pallas" and grouped_gemm.dequant_gemm(fits) == "mosaic"
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 192)
    assert grouped_gemm._packed_path("pallas", fits, 64.0) == ("w4a16", "pallas")
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_GEMM", "pallas")
    assert grouped_gemm.dequant_gemm(fits) == "pallas"
    mosaic_dequant.setenv(grouped_gemm.DEQUANT_GEMM_ENV, "mosaic")  # the environment overrides the constant
    assert grouped_gemm.dequant_gemm(fits) == "mosaic"
    mosaic_dequant.setenv(grouped_gemm.DEQUANT_GEMM_ENV, "cublas")
    with pytest.raises(ValueError, match="ATOM_JAX_DEQUANT_GEMM is 'cublas'"):
        grouped_gemm.dequant_gemm(fits)
    mosaic_dequant.delenv(grouped_gemm.DEQUANT_GEMM_ENV)
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_GEMM", "cublas")
    with pytest.raises(ValueError, match="DEQUANT_GEMM is 'cublas'"):
        grouped_gemm.dequant_gemm(fits)


def test_decode_ahead_and_fused_gate_up_follow_the_mosaic_choice(mosaic_dequant):
    """Hopper simulated: experts decoded ahead for 'pallas' name the Mosaic kernel (`Decoded`),
    which `get` runs on them; for 'mosaic' they are plain bf16 (its own bf16 backend); the gate and
    up GEMMs are not fused into the Pallas pair kernel (the pair is the Pallas kernel's)."""
    mosaic_dequant.setattr(grouped_gemm, "is_hopper", lambda: True)
    mosaic_dequant.setattr(grouped_gemm, "FUSE_GATE_UP_MIN_ROWS_PER_GROUP", 0)
    w = _packed(2, 256, 512)
    ahead = jax.eval_shape(lambda v: grouped_gemm.decode_ahead("pallas", v, 512.0, jnp.bfloat16), w)
    assert isinstance(ahead, grouped_gemm.Decoded) and ahead.backend == "mosaic"
    assert ahead.shape == (2, 256, 512) and ahead.dtype == jnp.bfloat16
    own = jax.eval_shape(lambda v: grouped_gemm.decode_ahead("mosaic", v, 512.0, jnp.bfloat16), w)
    assert not isinstance(own, grouped_gemm.Decoded) and own.shape == (2, 256, 512)
    assert not grouped_gemm.fused_gate_up("pallas", w, w, 512.0)
    assert not grouped_gemm.fused_gate_up("pallas", ahead, ahead, 512.0)
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_GEMM", "pallas")  # the control: the pair fuses
    assert grouped_gemm.fused_gate_up("pallas", w, w, 512.0)


@pytest.mark.parametrize("ahead", [False, True], ids=["packed", "decoded-ahead"])
def test_seam_dequant_path_through_mosaic_lowers_for_cuda(mosaic_dequant, ahead):
    """Hopper simulated, lowered for CUDA on CPU: the MoE's w3 call on packed experts (or on
    experts `decode_ahead` decoded) is the decode kernel (one Triton call), then the Mosaic
    kernel on the rows gathered in XLA, the SwiGLU in XLA."""
    mosaic_dequant.setattr(grouped_gemm, "is_hopper", lambda: True)
    g, k, n, m, r = 4, 256, 512, 64, 48

    def f(x, c, s, sizes, ids, gate):
        w = packed.Fp4Weights(c, s)
        if ahead:
            w = grouped_gemm.decode_ahead("pallas", w, m / g, x.dtype)
            assert isinstance(w, grouped_gemm.Decoded)
        return grouped_gemm.get("pallas")(x, w, sizes, row_ids=ids, zero_tail=False, epilogue=(SWIGLU, gate))

    args = (jax.ShapeDtypeStruct((r, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((g, k // 32, n), jnp.uint8), jax.ShapeDtypeStruct((g,), jnp.int32),
            jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m, n), jnp.bfloat16))
    with lowering_for("cuda"):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "fp4_dequant" in text
    assert "mosaic_gpu" in text


def test_bench_w4a16_tiny_skips_the_mosaic_rows_off_hopper(tmp_path, capsys, monkeypatch):
    """`bench w4a16 --tiny` with the Mosaic rows asked for, on CPU: skipped with the reason printed,
    the other rows (the seam's dequant path as the MoE calls it too) checked and timed; on Hopper
    (simulated) only a shape its tiles do not divide skips them."""
    import json

    from atom_jax.bench.__main__ import main
    from atom_jax.bench.w4a16 import CHECK_TOL, _mosaic_unfit
    path = tmp_path / "w4a16.json"
    assert main(["w4a16", "--tiny", "--kernels", "dequant_pallas,dequant_mosaic,dequant_mosaic_kmajor,seam_pallas,"
                 "seam_mosaic", "--iters", "1", "--json", str(path)]) == 0
    assert ("skipped dequant_mosaic, dequant_mosaic_kmajor, seam_mosaic: the Mosaic kernel needs an NVIDIA Hopper "
            "GPU" in capsys.readouterr().out)
    out = json.loads(path.read_text())
    assert {r["kernel"] for r in out["results"]} == {"bf16", "dequant_pallas", "seam_pallas"}
    assert all(out["checks"]["tiny_up"][k] < CHECK_TOL for k in ("dequant_pallas", "seam_pallas"))
    monkeypatch.setattr(grouped_gemm, "is_hopper", lambda: True)
    assert _mosaic_unfit({"tiny_up": (4, 128, 256)}, "H200") is None
    assert "pro_mid" in _mosaic_unfit({"tiny_up": (4, 128, 256), "pro_mid": (4, 128, 384)}, "H200")


def test_prefill_sweep_mosaic_tiles_fit_the_prefill_shapes_and_lower():
    """`--prefill-sweep`'s Mosaic candidates: distinct, dividing the V4-Flash and V4-Pro up/down
    shapes' K and N, within Hopper's 227 KiB of shared memory (the TMA ring + the epilogue's two
    buffers), and each lowers for CUDA with this jax (the compile is the GPU run's)."""
    from atom_jax.bench.gemm import SHAPES
    from atom_jax.bench.w4a16_prefill import MOSAIC_TILES
    from atom_jax.kernels import mosaic_grouped_gemm as mg
    assert len(set(MOSAIC_TILES)) == len(MOSAIC_TILES) and MOSAIC_TILES[0] == dataclasses.astuple(mg.PREFILL_MOSAIC)
    x = jax.ShapeDtypeStruct((1000, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((5, 512, 512), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((5,), jnp.int32)
    for t in MOSAIC_TILES:
        cfg = mg.MosaicTiles(*t)
        assert all(mg.fits(k, n, cfg) for _, k, n in SHAPES.values()), cfg
        ring = (cfg.tile_m + 2 * cfg.tile_n) * cfg.tile_k * 2 * cfg.stages
        assert ring + 2 * cfg.epi_m * cfg.tile_n * 2 <= 227 * 1024, cfg
        fn = jax.jit(lambda a, b, s, c=cfg: mg.grouped_gemm(a, b, s, c))
        assert "mosaic_gpu" in fn.trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("gemm", ["mosaic", "pallas"])
def test_moe_with_fp4_experts_lowers_to_decodes_then_the_chosen_gemm(mosaic_dequant, gemm):
    """Hopper simulated, the routed experts as the model calls them (K-major FP4 codes, the GPU
    layout; 'auto'; 192 rows per expert) lowered for CUDA: three decode kernels, then the three
    GEMMs on the Mosaic kernel where DEQUANT_GEMM = "mosaic", on the Pallas (Triton) kernel else."""
    import re

    from atom_jax.models.moe import routed_experts
    mosaic_dequant.setattr(grouped_gemm, "is_hopper", lambda: True)
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 192)
    mosaic_dequant.setattr(grouped_gemm, "DEQUANT_GEMM", gemm)
    t, d, i, e, topk = 256, 256, 256, 8, 6

    def f(x, idx, wts, *codes_scales):
        w1, w3, w2 = (packed.Fp4WeightsKMajor(c, s) for c, s in zip(codes_scales[::2], codes_scales[1::2]))
        return routed_experts(x, idx, wts, w1, w3, w2, 7.0, backend="auto", n_experts=e)

    S = jax.ShapeDtypeStruct
    up = (S((e, i, d // 2), jnp.uint8), S((e, d // 32, i), jnp.uint8))
    args = (S((t, d), jnp.bfloat16), S((t, topk), jnp.int32), S((t, topk), jnp.float32), *up, *up,
            S((e, d, i // 2), jnp.uint8), S((e, i // 32, d), jnp.uint8))
    with lowering_for("cuda"):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"stablehlo\.custom_call @(\S+?)\(", text)
    triton, mosaic = calls.count("__gpu$xla.gpu.triton"), sum(c.startswith("mosaic_gpu") for c in calls)
    assert (triton, mosaic) == ((3, 3) if gemm == "mosaic" else (6, 0)), calls
