"""The compiled FP4 -> bf16 decode kernel on a GPU (both decoders) against the jnp decode, and the
seam's dequant path (decode kernel + bf16 Pallas kernel) against a float32 reference and the
in-kernel W4A16 path on a skewed routing (empty and very large groups), as the MoE calls it.
Run with `JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_fp4_dequant_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp4_dequant import check_seam_paths, random_packed
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import fp4_dequant as fd
from atom_jax.kernels import packed

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("decode", ["ptx", "alu", None])
@pytest.mark.parametrize("tiles", [fd.DEFAULT_TILES, fd.DequantTiles(block_k=256, block_n=256, num_warps=8)],
                         ids=["default", "256x256"])
def test_compiled_decode_equals_reference_dequant(tiles, decode):
    # scales from 2**-125: no subnormal outputs, which a GPU path may flush to zero
    w = random_packed(np.random.default_rng(), 4, 1024, 2048, lowest=2)
    out = jax.jit(lambda v: fd.dequantize(v, tiles, decode=decode))(w)
    ref = jax.jit(lambda v: packed.fp4_dequantize(v, jnp.float32).astype(jnp.bfloat16))(w)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_compiled_seam_dequant_path_matches_reference(monkeypatch):
    check_seam_paths(monkeypatch, g=16, k=512, n=512, r=300, m=1000, trailing=7, jit=True)


@pytest.mark.parametrize("decode", ["ptx", "alu"])
@pytest.mark.parametrize("tiles", [fd.KMAJOR_TILES, fd.DequantTiles(block_k=256, block_n=128, num_warps=8),
                                   fd.DequantTiles(block_k=512, block_n=64, gather_codes=True)],
                         ids=["default", "256x128", "gather"])
def test_compiled_k_major_decode_equals_reference_dequant(tiles, decode):
    """`dequantize_k_major` compiled, both decoders, the code bytes spread in Triton (broadcast +
    reshape) or gathered (each read twice): [E, N, K], the reference decode transposed, bit for bit
    (a join + reshape of two decoded halves before it was wrong on an H200)."""
    w = random_packed(np.random.default_rng(), 4, 1024, 2048, lowest=2)
    out = jax.jit(lambda v: fd.dequantize_k_major(v, tiles, decode=decode))(packed.to_k_major(w))
    ref = jax.jit(lambda v: packed.fp4_dequantize(v, jnp.float32).astype(jnp.bfloat16))(w)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.swapaxes(np.asarray(ref, np.float32), 1, 2))


def test_compiled_seam_dequant_path_k_major_matches_reference(monkeypatch):
    """K-major codes: the no-transpose decode, then the bf16 kernel with `transpose_b`."""
    check_seam_paths(monkeypatch, g=16, k=512, n=512, r=300, m=1000, trailing=7, jit=True, k_major=True)


@pytest.mark.parametrize("k_major", [False, True], ids=["nmajor", "kmajor"])
def test_compiled_seam_dequant_path_through_mosaic_matches_reference(monkeypatch, k_major):
    """`grouped_gemm.DEQUANT_GEMM = "mosaic"` on Hopper: the decode kernel to [E, K, N] (K-major codes
    through the transposing decode), then the Mosaic kernel, the rows gathered and the SwiGLU
    applied in XLA, on a skewed routing (empty and very large groups), against float64 and the
    in-kernel W4A16 path; then experts `decode_ahead` decoded (`Decoded`) give the same values."""
    from atom_jax.kernels import grouped_gemm
    from atom_jax.kernels import mosaic_grouped_gemm as mg
    if not grouped_gemm.is_hopper():
        pytest.skip(f"the Mosaic kernel needs an NVIDIA Hopper GPU (this one: {jax.devices()[0].device_kind})")
    monkeypatch.setattr(grouped_gemm, "DEQUANT_GEMM", "mosaic")
    monkeypatch.setattr(grouped_gemm, "KMAJOR_DECODE_TO_NK", False)
    calls = []
    real = mg.grouped_gemm
    monkeypatch.setattr(mg, "grouped_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_seam_paths(monkeypatch, g=16, k=512, n=512, r=300, m=1000, trailing=7, jit=True, k_major=k_major)
    assert calls, "DEQUANT_GEMM = 'mosaic' must run the Mosaic kernel on Hopper"
    rng = np.random.default_rng()
    g, k, n, m = 16, 512, 512, 1000
    w, _ = random_fp4_experts(rng, g, k, n)
    w = packed.to_k_major(w) if k_major else w
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    sizes = jnp.asarray(skewed_sizes(rng, m, g))
    ahead = grouped_gemm.decode_ahead("pallas", w, m / g, jnp.bfloat16)
    assert isinstance(ahead, grouped_gemm.Decoded) and ahead.backend == "mosaic"
    run = jax.jit(lambda a, b, s: grouped_gemm.get("pallas")(a, b, s))
    got, want = (np.asarray(run(x, v, sizes), np.float32) for v in (ahead, w))
    np.testing.assert_array_equal(got, want)
