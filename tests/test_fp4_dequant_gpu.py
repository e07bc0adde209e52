"""The compiled FP4 -> bf16 decode kernel on a GPU (both decoders) against the jnp decode, and the
seam's dequant path (decode kernel + bf16 Pallas kernel) against a float32 reference and the
in-kernel W4A16 path on a skewed routing (empty and very large groups), as the MoE calls it.
Run with `JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_fp4_dequant_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp4_dequant import check_seam_paths, random_packed

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
