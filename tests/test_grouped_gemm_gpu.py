"""The compiled (not interpreted) grouped-GEMM kernels on a GPU against a float32 reference,
fresh skewed routings with empty and very large groups. Run on a GPU machine with
`JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests` (skipped on CPU with a reason)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference
from row_ids_check import check_row_ids_and_epilogue

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels import pallas_grouped_gemm as pg

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("trailing", [0, 7])
@pytest.mark.parametrize("tiles", [pg.DECODE_TILES, pg.PREFILL_TILES], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", ["pallas", "capacity_dropless"])
def test_compiled_kernels_match_float32_reference(tiles, backend, trailing):
    """`trailing` rows in no group come out zero; with none, the last tile runs past row M of
    the unpadded rows (masked loads and stores)."""
    rng = np.random.default_rng()
    g, k, n, m = 16, 512, 512, 1000
    sizes = skewed_sizes(rng, m - trailing, g)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    if backend == "pallas":
        fn = jax.jit(lambda a, b, s: pg.grouped_gemm(a, b, s, cfg=tiles))
    else:
        fn = jax.jit(lambda a, b, s: grouped_gemm.get(backend)(a, b, s, mean_group=m / g / 4))
    out = np.asarray(fn(x, w, jnp.asarray(sizes)), np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2  # bf16 output rounding
    assert np.all(out[sizes.sum():] == 0)


@pytest.mark.parametrize("tiles", [pg.DECODE_TILES, pg.PREFILL_TILES], ids=["decode", "prefill"])
def test_compiled_transpose_b_matches_float32_reference(tiles):
    """`transpose_b` compiled: weights stored [G, N, K] (K-major B tiles), skewed routing."""
    rng = np.random.default_rng()
    g, k, n, m, trailing = 16, 512, 512, 1000, 7
    sizes = skewed_sizes(rng, m - trailing, g)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    fn = jax.jit(lambda a, b, s: pg.grouped_gemm(a, b, s, cfg=tiles, transpose_b=True))
    out = np.asarray(fn(x, jnp.swapaxes(w, 1, 2), jnp.asarray(sizes)), np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2  # bf16 output rounding
    assert np.all(out[sizes.sum():] == 0)


@pytest.mark.parametrize("m,trailing", [(1500, 5), (1496, 0), (1496, 9)])
def test_mosaic_kernel_matches_float32_reference(m, trailing):
    """Our Mosaic GPU (Hopper) kernel: skewed sizes put group starts off 8-row boundaries, the
    case that zero-filled rows before tiles were aligned down to 8 rows. M = 1500 takes the
    padded path (M not a multiple of 8); M = 1496 reads the rows in place, so the last tile's
    TMA load runs past row M; `trailing` rows past the last group come out zero."""
    from atom_jax.kernels import mosaic_grouped_gemm as mg
    rng = np.random.default_rng()
    g, k, n = 24, 512, 512
    sizes = skewed_sizes(rng, m - trailing, g)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    out = np.asarray(jax.jit(mg.grouped_gemm)(x, w, jnp.asarray(sizes)), np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    row_err = np.linalg.norm(out - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
    assert np.all(row_err[:sizes.sum()] < 2e-2)  # every row, not just the norm
    assert np.all(out[sizes.sum():] == 0)


def test_auto_plain_call_in_the_mosaic_window_runs_mosaic():
    """`auto` on a down-projection-like call (rows in place, no epilogue, rows unwritten past the
    groups allowed) at rows per expert inside MOSAIC_PLAIN_ROWS_PER_GROUP: lowered to the Mosaic
    kernel (no Triton call) on the H200, every group row right against float32."""
    lo, hi = grouped_gemm.MOSAIC_PLAIN_ROWS_PER_GROUP
    rng = np.random.default_rng()
    g, k, n = 16, 512, 512
    rpg = (lo + hi) / 2
    sizes = skewed_sizes(rng, int(g * rpg), g)
    x = jnp.asarray(rng.standard_normal((int(g * rpg), k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    fn = jax.jit(lambda a, b, s: grouped_gemm.get("auto")(a, b, s, mean_group=rpg, zero_tail=False))
    text = fn.lower(x, w, jnp.asarray(sizes)).as_text()
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
    out = np.asarray(fn(x, w, jnp.asarray(sizes)), np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    row_err = np.linalg.norm(out - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
    assert np.all(row_err < 2e-2)


@pytest.mark.parametrize("backend", ["pallas", "mosaic"])
def test_moe_through_compiled_kernels_matches_float32_experts(backend):
    """The routed-expert MoE as the model calls it, with half the experts held elsewhere (their
    rows sort past the last local group and must not leak into the sum): bf16 through the
    compiled kernel against the float32 `dense` backend on the same bf16 values."""
    from atom_jax.models.moe import routed_experts
    rng = np.random.default_rng()
    t, d, i, e_all, topk = 300, 512, 256, 32, 6
    e_local, offset = e_all // 2, e_all // 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e_all, topk, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.random((t, topk)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e_local, d, i)) / np.sqrt(d), jnp.bfloat16) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e_local, i, d)) / np.sqrt(i), jnp.bfloat16)
    run = jax.jit(lambda *a, backend: routed_experts(*a, 7.0, expert_offset=offset, backend=backend),
                  static_argnames="backend")
    out = np.asarray(run(x, idx, w, w1, w3, w2, backend=backend), np.float32)
    f32 = [a.astype(jnp.float32) for a in (x, w1, w3, w2)]
    ref = np.asarray(run(f32[0], idx, w, *f32[1:], backend="dense"), np.float32)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-2  # bf16 rounding of h and out


@pytest.mark.parametrize("tokens", [16, 2048], ids=["decode", "prefill"])
def test_moe_with_kmajor_bf16_experts_matches_float32_experts(tokens):
    """`--expert-layout kmajor` with bf16 experts: the stacks held [E, N, K] and handed to the
    seam as `DenseKMajor`, so the compiled Pallas kernel multiplies them with `transpose_b`, at
    decode rows per expert (DECODE_TILES: unmeasured before) and at prefill ones (PREFILL_TILES),
    half the experts held elsewhere, against the float32 [E, K, N] experts through `dense`."""
    from atom_jax.kernels.packed import DenseKMajor
    from atom_jax.models.moe import mean_rows_per_expert, routed_experts
    rng = np.random.default_rng()
    d, i, e_all, topk = 512, 256, 32, 6
    e_local, offset = e_all // 2, e_all // 2
    want = pg.DECODE_TILES if tokens == 16 else pg.PREFILL_TILES
    assert pg.default_tiles(mean_rows_per_expert(tokens, topk, e_all)) == want
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e_all, topk, replace=False) for _ in range(tokens)]), jnp.int32)
    w = jnp.asarray(rng.random((tokens, topk)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e_local, d, i)) / np.sqrt(d), jnp.bfloat16) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e_local, i, d)) / np.sqrt(i), jnp.bfloat16)
    run = jax.jit(lambda *a, backend: routed_experts(*a, 7.0, expert_offset=offset, backend=backend,
                                                     n_experts=e_all), static_argnames="backend")
    k_major = [DenseKMajor(jnp.swapaxes(a, 1, 2)) for a in (w1, w3, w2)]
    out = np.asarray(run(x, idx, w, *k_major, backend="pallas"), np.float32)
    f32 = [a.astype(jnp.float32) for a in (x, w1, w3, w2)]
    ref = np.asarray(run(f32[0], idx, w, *f32[1:], backend="dense"), np.float32)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-2  # bf16 rounding of h and out


@pytest.mark.parametrize("tiles", [pg.DECODE_TILES, pg.PREFILL_TILES], ids=["decode", "prefill"])
def test_compiled_row_ids_gather_matches_gathered_rows(tiles):
    """`row_ids`: the kernel loads rows[row_ids[r]] itself (the MoE's first GEMMs); the same
    bf16 tiles as on the rows gathered in XLA, so the outputs agree to accumulation order."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((16, 512, 512)) / np.sqrt(512), jnp.bfloat16)
    check_row_ids_and_epilogue(pg.grouped_gemm, w, tiles, rng, 16, 512, 512, rows=400, m=1000, trailing=9)


@pytest.mark.parametrize("tiles", [pg.pair_tiles(192), pg.TileConfig(64, 128, 64, 4, 4)], ids=["pair", "pair64"])
@pytest.mark.parametrize("k_major", [False, True])
def test_compiled_gate_up_pair_matches_the_two_calls(tiles, k_major):
    """`grouped_gemm_pair` compiled against the two compiled calls it replaces."""
    from pair_check import check_pair_against_two_calls
    check_pair_against_two_calls(np.random.default_rng(), tiles, pg.PREFILL_TILES, 16, 512, 512, r=400, m=1000,
                                 trailing=9, interpret=False, zero_tail=True, k_major=k_major)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_compiled_half_tail_matches_float32_reference(transpose_b):
    """`half_tail` at the prefill tiles, compiled: groups whose last tile has 1, 64 (half tiles)
    or 65, 128 rows left (whole ones), empty groups, fresh random sizes; rows past the groups zero."""
    rng = np.random.default_rng()
    tiles = pg.TileConfig(128, 256, 64, 8, 4, half_tail=True)
    sizes = np.array([1, 64, 65, 128, 129, 192, 200, 0, 256, 0] + list(rng.integers(0, 300, 6)))
    g, k, n = len(sizes), 512, 512
    m = int(sizes.sum()) + 3
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16)
    fn = jax.jit(lambda a, b, s: pg.grouped_gemm(a, b, s, cfg=tiles, transpose_b=transpose_b))
    out = np.asarray(fn(x, jnp.swapaxes(w, 1, 2) if transpose_b else w, jnp.asarray(sizes)), np.float32)
    ref = grouped_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    used = int(sizes.sum())
    assert np.linalg.norm(out[:used] - ref[:used]) / np.linalg.norm(ref[:used]) < 1e-2  # bf16 output rounding
    assert np.all(out[used:] == 0)
