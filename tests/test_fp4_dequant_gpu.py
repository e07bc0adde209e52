"""The compiled FP4 -> bf16 decode kernel on a GPU (both decoders) against the jnp decode, and the
seam's dequant path (decode kernel + bf16 Pallas kernel) against a float32 reference and the
in-kernel W4A16 path on a skewed routing (empty and very large groups), as the MoE calls it.
Run with `JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_fp4_dequant_gpu.py`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from test_fp4_dequant import random_packed
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import fp4_dequant as fd
from atom_jax.kernels import grouped_gemm, packed
from atom_jax.models.layers import swiglu_clamped

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
    rng = np.random.default_rng()
    g, k, n, r, m, trailing = 16, 512, 512, 300, 1000, 7
    sizes = jnp.asarray(skewed_sizes(rng, m - trailing, g))
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    gate = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.bfloat16)
    w, dense = random_fp4_experts(rng, g, k, n)
    swiglu = functools.partial(swiglu_clamped, limit=2.0)

    def call(a, b, s, i, gt):
        return grouped_gemm.get("pallas")(a, b, s, row_ids=i, zero_tail=False, epilogue=(swiglu, gt))

    in_kernel = np.asarray(jax.jit(call)(x, w, sizes, ids, gate), np.float32)
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    via_bf16 = np.asarray(jax.jit(call)(x, w, sizes, ids, gate), np.float32)
    valid = m - trailing
    ref = grouped_reference(np.asarray(x, np.float32)[np.asarray(ids)], dense, np.asarray(sizes))
    want = np.asarray(swiglu(gate.astype(jnp.float32), jnp.asarray(ref, jnp.float32)), np.float32)[:valid]
    for got in (via_bf16, in_kernel):
        assert np.all(np.isfinite(got[:valid]))
        np.testing.assert_allclose(got[:valid], want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    np.testing.assert_allclose(via_bf16[:valid], in_kernel[:valid], rtol=2e-2, atol=2e-2 * np.abs(want).max())
