"""The MoE's gate and up GEMMs as one Pallas kernel (`pallas_grouped_gemm.grouped_gemm_pair`,
interpret mode on CPU) against the two-call path it replaces and a float64 reference; the
seam's choice (`grouped_gemm.fused_gate_up`) and the MoE through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pair_check import SWIGLU, check_pair_against_two_calls

from atom_jax.bench.w4a16 import random_fp4
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels import pallas_grouped_gemm as pg
from atom_jax.kernels.packed import DenseKMajor, to_k_major
from atom_jax.models.moe import routed_experts

SMALL = pg.TileConfig(block_m=16, block_n=32, block_k=16)


@pytest.mark.parametrize("zero_tail,k_major", [(True, False), (False, True)])
def test_pair_matches_the_two_calls_and_float64(zero_tail, k_major):
    check_pair_against_two_calls(np.random.default_rng(), SMALL, pg.TileConfig(16, 64, 16), 5, 64, 64, r=30, m=90,
                                 trailing=7, interpret=True, zero_tail=zero_tail, k_major=k_major)


def test_pair_refuses_mismatched_stacks_and_an_epilogue():
    x = jnp.zeros((8, 16), jnp.float32)
    w = jnp.zeros((2, 16, 32), jnp.float32)
    s, e = jnp.asarray([0, 4], jnp.int32), jnp.asarray([4, 8], jnp.int32)
    with pytest.raises(ValueError, match="one shape"):
        pg.grouped_gemm_ranges(x, (w, w[:, :, :16]), s, e, SMALL, interpret=True, combine=SWIGLU)
    with pytest.raises(ValueError, match="exclusive"):
        pg.grouped_gemm_ranges(x, (w, w), s, e, SMALL, interpret=True, combine=SWIGLU, epilogue=(SWIGLU, x))


def test_fused_gate_up_is_the_seams_bf16_pallas_path_from_the_constant(monkeypatch):
    w = jnp.zeros((4, 256, 512), jnp.bfloat16)
    fp4 = random_fp4(jax.random.key(0), 4, 256, 512)
    assert not grouped_gemm.fused_gate_up("pallas", w, w, 1e6)  # the default: never, until measured
    monkeypatch.setattr(grouped_gemm, "FUSE_GATE_UP_MIN_ROWS_PER_GROUP", 64)
    assert grouped_gemm.fused_gate_up("pallas", w, w, 64)
    assert not grouped_gemm.fused_gate_up("pallas", w, w, 63)
    assert not grouped_gemm.fused_gate_up("auto", w, w, 192)  # CPU: auto is ragged_dot
    assert not grouped_gemm.fused_gate_up("ragged_dot", w, w, 192)
    assert not grouped_gemm.fused_gate_up("pallas", w, w[:, :, :256], 192)
    w320 = jnp.zeros((4, 256, 320), jnp.bfloat16)
    assert not grouped_gemm.fused_gate_up("pallas", w320, w320, 192)  # 128-wide column tiles do not divide N
    # FP4 experts: only where the seam decodes them to bf16 for the Pallas kernel
    assert grouped_gemm.fused_gate_up("pallas", fp4, fp4, grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP)
    assert not grouped_gemm.fused_gate_up("pallas", fp4, fp4, grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP - 1)
    assert not grouped_gemm.fused_gate_up("pallas", fp4, w, grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP)
    km = DenseKMajor(jnp.zeros((4, 512, 256), jnp.bfloat16))  # decoded K-major experts (decode_ahead's)
    assert grouped_gemm.fused_gate_up("pallas", km, km, 192) and not grouped_gemm.fused_gate_up("pallas", km, w, 192)


def test_moe_with_the_fused_gate_up_matches_the_two_calls(monkeypatch):
    """routed_experts on the Pallas backend, fused vs not: same output (fresh inputs)."""
    rng = np.random.default_rng()
    n, d, i, e, k = 24, 64, 64, 6, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, i)) / np.sqrt(d), jnp.bfloat16) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, i, d)) / np.sqrt(i), jnp.bfloat16)
    run = jax.jit(lambda *a: routed_experts(*a, 2.5, backend="pallas"))
    two = np.asarray(run(x, idx, weights, w1, w3, w2), np.float32)
    calls = []
    real = pg.grouped_gemm_pair
    monkeypatch.setattr(pg, "grouped_gemm_pair", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(grouped_gemm, "FUSE_GATE_UP_MIN_ROWS_PER_GROUP", 0)
    fused = np.asarray(jax.jit(lambda *a: routed_experts(*a, 2.5, backend="pallas"))(x, idx, weights, w1, w3, w2),
                       np.float32)
    assert calls  # the fused kernel ran
    np.testing.assert_allclose(fused, two, rtol=2e-2, atol=2e-2 * np.abs(two).max())


@pytest.mark.parametrize("k_major,to_nk", [(False, False), (True, False), (True, True)],
                         ids=["nmajor", "kmajor", "kmajor-to-nk"])
def test_gate_up_on_fp4_experts_decoded_then_fused_matches_the_two_calls(monkeypatch, k_major, to_nk):
    """Packed FP4 experts at prefill rows per expert: the seam decodes them (`fp4_dequant`; K-major
    codes to `DenseKMajor` where KMAJOR_DECODE_TO_NK) and runs the pair; same values as the two
    decoded calls."""
    monkeypatch.setattr(grouped_gemm, "KMAJOR_DECODE_TO_NK", to_nk)
    rng = np.random.default_rng()
    g, k, n, r, m = 4, 256, 256, 16, 40
    w1, w3 = (random_fp4(jax.random.key(int(rng.integers(1 << 30))), g, k, n) for _ in range(2))
    if k_major:
        w1, w3 = to_k_major(w1), to_k_major(w3)
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    sizes = jnp.asarray(np.bincount(rng.integers(0, g, m), minlength=g), jnp.int32)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    mean = grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP

    def run():
        return np.asarray(grouped_gemm.gate_up("pallas", x, w1, w3, sizes, SWIGLU, mean_group=mean, row_ids=ids),
                          np.float32)

    two = run()
    monkeypatch.setattr(grouped_gemm, "FUSE_GATE_UP_MIN_ROWS_PER_GROUP", 0)
    calls = []
    real = pg.grouped_gemm_pair
    monkeypatch.setattr(pg, "grouped_gemm_pair", lambda *a, **kw: calls.append(kw["transpose_b"]) or real(*a, **kw))
    fused = run()
    assert calls == [to_nk]
    np.testing.assert_allclose(fused, two, rtol=2e-2, atol=2e-2 * np.abs(two).max())
