"""MoE route / unroute without materialising every (token, choice) row: the combine by gather
(inverse permutation) against the scatter-add formulation it replaced (through the Pallas
kernel too, whose rows past the last group are left unwritten: NaN in interpret mode, so a leak
would show), and the grouped-GEMM kernels' `row_ids` (A rows gathered inside the kernel,
interpret mode on CPU) against the kernels on rows gathered in XLA. Fresh random inputs; skewed routings: empty experts, one
expert holding most rows, choices of other ranks' experts (rows past the last group)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_w4a16 import random_fp4_experts

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels import pallas_grouped_gemm as pg
from atom_jax.kernels import w4a16_grouped_gemm as wg
from atom_jax.kernels.platform import lowering_for
from atom_jax.models.layers import swiglu_clamped
from atom_jax.models import moe
from atom_jax.models.moe import routed_experts, sort_by_expert

SMALL = pg.TileConfig(block_m=16, block_n=32, block_k=32)
TRITON = "__gpu$xla.gpu.triton"


def _scatter_reference(x, idx, weights, w1, w3, w2, limit, expert_offset):
    """The formulation routed_experts had before: gather every (token, choice) row, scale the
    sorted outputs, f32 scatter-add back to tokens (ragged_dot)."""
    gemm = grouped_gemm.get("ragged_dot")
    n, k = idx.shape
    e_local = w1.shape[0]
    local = idx.reshape(-1) - expert_offset
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local)
    order = jnp.argsort(key, stable=True)  # the route, sorted
    sizes = jnp.bincount(key, length=e_local + 1)[:e_local]
    token = order // k
    rows = x[token]
    h = swiglu_clamped(gemm(rows, w1, sizes).astype(jnp.float32), gemm(rows, w3, sizes).astype(jnp.float32), limit)
    out = gemm(h.astype(x.dtype), w2, sizes).astype(jnp.float32)
    out = out * jnp.where(valid, weights.reshape(-1), 0.0)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out).astype(x.dtype)


def _skewed_routing(rng, n, k, e_all, hot):
    """idx [n, k] of distinct experts: every token's first choice is expert `hot` (one very
    large group), the rest uniform over a third of the experts (the others stay empty)."""
    pool = rng.choice(np.setdiff1d(np.arange(e_all), [hot]), max(k, e_all // 3), replace=False)
    rest = np.stack([rng.choice(pool, k - 1, replace=False) for _ in range(n)])
    return np.concatenate([np.full((n, 1), hot), rest], axis=1).astype(np.int32)


@pytest.mark.parametrize("backend", ["ragged_dot", "pallas"])
def test_combine_by_gather_matches_scatter_formulation(backend):
    """This rank holds experts [4, 12) of 16: tokens with no choice local (all in [0, 4)), all
    local (all in [4, 12)), mixed ones and ones choosing an expert twice; one local expert takes
    every mixed token, some local experts none."""
    rng = np.random.default_rng()
    n, k, d, i, e_all, e_local, offset = 40, 3, 32, 32, 16, 8, 4
    idx = _skewed_routing(rng, n, k, e_all, hot=offset + 2)
    idx[:5] = np.stack([rng.choice(offset, k, replace=False) for _ in range(5)])  # none local
    idx[5:10] = np.stack([offset + rng.choice(e_local, k, replace=False) for _ in range(5)])  # all local
    # a local expert twice in one token's top-k (a checkpoint's hash table is only range-checked):
    # two rows of that expert, both summed with their own weights
    idx[10:14, 1] = idx[10:14, 0]
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e_local, d, i)) / 4, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e_local, i, d)) / 4, jnp.float32)
    out = np.asarray(routed_experts(x, jnp.asarray(idx), w, w1, w3, w2, 7.0, expert_offset=offset, backend=backend))
    ref = np.asarray(_scatter_reference(x, jnp.asarray(idx), w, w1, w3, w2, 7.0, offset))
    assert np.all(out[:5] == 0)  # no local choice: nothing added
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # f32 summation order only


def test_bf16_combine_matches_scatter_formulation():
    """bf16 activations, every choice local (dp=1: no row past the groups): the outputs agree
    to bf16 rounding of the (f32-accumulated) sum."""
    rng = np.random.default_rng()
    n, k, d, i, e = 32, 4, 64, 32, 8
    idx = jnp.asarray(_skewed_routing(rng, n, k, e, hot=int(rng.integers(e))))
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, i)) / 8, jnp.bfloat16) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, i, d)) / 6, jnp.bfloat16)
    out = np.asarray(routed_experts(x, idx, w, w1, w3, w2, 7.0), np.float32)
    ref = np.asarray(_scatter_reference(x, idx, w, w1, w3, w2, 7.0, 0), np.float32)
    assert out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def _gather_case(rng, r, m, g, k, n, trailing):
    sizes = skewed_sizes(rng, m - trailing, g)  # empty groups, one very large, `trailing` rows in none
    x = rng.standard_normal((r, k)).astype(np.float32)
    ids = rng.integers(0, r, m).astype(np.int32)
    return x, jnp.asarray(ids), jnp.asarray(sizes)


@pytest.mark.parametrize("trailing", [0, 11])
def test_pallas_row_ids_match_gathered_rows(trailing):
    rng = np.random.default_rng()
    r, m, g, k, n = 30, 90, 6, 64, 64
    x, ids, sizes = _gather_case(rng, r, m, g, k, n, trailing)
    w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.float32)
    out = np.asarray(pg.grouped_gemm(jnp.asarray(x), w, sizes, cfg=SMALL, interpret=True, row_ids=ids))
    ref = np.asarray(pg.grouped_gemm(jnp.asarray(x)[ids], w, sizes, cfg=SMALL, interpret=True))
    assert out.shape == (m, n)
    np.testing.assert_array_equal(out, ref)  # the same tiles, loaded another way
    assert np.all(out[m - trailing:] == 0) and np.abs(out[:m - trailing]).max() > 0
    # zero_tail=False (the MoE): the group rows are the same; the rest is left unwritten
    # (interpret mode fills unwritten rows with NaN, so a caller that read them would see it)
    lazy = np.asarray(pg.grouped_gemm(jnp.asarray(x), w, sizes, cfg=SMALL, interpret=True, row_ids=ids,
                                      zero_tail=False))
    np.testing.assert_array_equal(lazy[:m - trailing], out[:m - trailing])


def test_w4a16_row_ids_match_gathered_rows():
    rng = np.random.default_rng()
    r, m, g, k, n = 25, 70, 5, 64, 32
    x, ids, sizes = _gather_case(rng, r, m, g, k, n, trailing=6)
    x = jnp.asarray(x, jnp.bfloat16)
    w, _ = random_fp4_experts(rng, g, k, n)
    tiles = pg.TileConfig(block_m=16, block_n=32, block_k=64)
    out = np.asarray(wg.grouped_gemm(x, w, sizes, cfg=tiles, interpret=True, row_ids=ids), np.float32)
    ref = np.asarray(wg.grouped_gemm(x[ids], w, sizes, cfg=tiles, interpret=True), np.float32)
    np.testing.assert_array_equal(out, ref)
    assert np.all(out[m - 6:] == 0)
    lazy = np.asarray(wg.grouped_gemm(x, w, sizes, cfg=tiles, interpret=True, row_ids=ids, zero_tail=False),
                      np.float32)
    np.testing.assert_array_equal(lazy[:m - 6], out[:m - 6])


def test_seam_row_ids_on_gathering_and_xla_backends():
    """Every CPU-runnable backend gives with row_ids what it gives on the gathered rows: the
    Pallas kernel gathers itself, the others in XLA."""
    rng = np.random.default_rng()
    r, m, g, k, n = 20, 48, 4, 32, 32
    x, ids, sizes = _gather_case(rng, r, m, g, k, n, trailing=5)
    x = jnp.asarray(x)
    w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.float32)
    assert {"pallas", "auto"} <= grouped_gemm.GATHERS_ROWS
    for name in ("ragged_dot", "dense", "pallas", "capacity_dropless", "auto"):
        gemm = grouped_gemm.get(name)
        out = np.asarray(gemm(x, w, sizes, mean_group=m / g, row_ids=ids))
        ref = np.asarray(gemm(x[ids], w, sizes, mean_group=m / g))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_clamped_matches_float64(dtype):
    """swiglu_clamped (SiLU through exp2, in float32, rounded once) against float64 SiLU with the
    clamps: float32 to a few ulps; bf16 inputs to the bf16 rounding of the exact result. Gates far
    below zero (exp2 overflows to inf: SiLU -> -0, not NaN, even where gate * up would overflow)
    and both clamps included."""
    from atom_jax.models.layers import swiglu_clamped
    rng = np.random.default_rng()
    limit = 7.0
    gate = np.concatenate([rng.standard_normal(4000) * 6, [-1e38, -1e4, -200.0, -88.0, 0.0, 7.0, 50.0]])
    up = np.concatenate([rng.standard_normal(4000) * 6, [7.0, 1.0, -3.0, 2.0, 5.0, -9.0, 9.0]])
    g, u = (jnp.asarray(a, dtype) for a in (gate, up))
    out = np.asarray(jax.jit(swiglu_clamped, static_argnums=2)(g, u, limit), np.float64)
    assert out.dtype == np.float64 and jnp.result_type(g) == np.dtype(dtype)
    g64, u64 = (np.asarray(a, np.float64) for a in (g, u))  # the inputs as given (bf16-rounded)
    g64 = np.minimum(g64, limit)
    with np.errstate(over="ignore"):  # exp(1e4) = inf: the exact SiLU there is -0
        ref = g64 / (1.0 + np.exp(-g64)) * np.clip(u64, -limit, limit)
    assert np.all(np.isfinite(out))
    tol = 4 * np.finfo(np.float32).eps if dtype == "float32" else 2.0 ** -8  # bf16: half an ulp + float32 work
    np.testing.assert_allclose(out, ref, rtol=tol, atol=1e-30)


@pytest.mark.parametrize("kernel", ["bf16", "w4a16"])
def test_swiglu_epilogue_matches_xla(kernel):
    """epilogue=(swiglu, gate): the kernel stores swiglu(gate, product) for the group rows, as
    the seam computes it in XLA for backends without it (from the float32 product in the kernel,
    from the product rounded to bf16 in XLA: bf16 tolerance)."""
    import functools
    from atom_jax.models.layers import swiglu_clamped
    rng = np.random.default_rng()
    r, m, g, k, n, trailing = 20, 60, 4, 64, 32, 7
    x, ids, sizes = _gather_case(rng, r, m, g, k, n, trailing)
    x = jnp.asarray(x, jnp.bfloat16)
    gate = jnp.asarray(rng.standard_normal((m, n)) * 3, jnp.bfloat16)
    w = (random_fp4_experts(rng, g, k, n)[0] if kernel == "w4a16"
         else jnp.asarray(rng.standard_normal((g, k, n)) / 4, jnp.bfloat16))
    epi = (functools.partial(swiglu_clamped, limit=2.0), gate)  # the clamps matter at this scale
    out = np.asarray(grouped_gemm.get("pallas")(x, w, sizes, row_ids=ids, zero_tail=False, epilogue=epi), np.float32)
    ref = np.asarray(grouped_gemm.get("ragged_dot")(x, w, sizes, row_ids=ids, epilogue=epi), np.float32)
    valid = m - trailing
    np.testing.assert_allclose(out[:valid], ref[:valid], rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    assert np.all(ref[valid:] == 0)


def test_ranked_route_is_the_stable_sort():
    """Decode-sized routes are ranked by comparisons (no sort, no scatter): the same
    permutation, inverse and group sizes as the stable sort, ties and other ranks' experts
    included."""
    rng = np.random.default_rng()
    n, k, e_local, offset = 37, 6, 5, 4
    idx = jnp.asarray(rng.integers(0, 16, (n, k)), jnp.int32)  # experts 0..15, local 4..8: many ties
    ranked = sort_by_expert(idx, offset, e_local)
    sorted_ = sort_by_expert(idx, offset, e_local, rank_max=0)
    local = np.asarray(idx).reshape(-1) - offset
    key = np.where((local >= 0) & (local < e_local), local, e_local)
    order = np.argsort(key, kind="stable")
    for got in (ranked, sorted_):
        np.testing.assert_array_equal(got[0], order)
        np.testing.assert_array_equal(np.asarray(got[1])[order], np.arange(n * k))
        np.testing.assert_array_equal(got[2], key < e_local)
        np.testing.assert_array_equal(got[3], np.bincount(key, minlength=e_local + 1)[:e_local])


@pytest.mark.gpu
def test_ranked_route_at_the_limit_on_gpu():
    """RANK_ROUTE_MAX pairs on the GPU: the stable sort's permutation and sizes, and the
    [M, M] compares fused into their reductions (no M x M buffer: XLA's temporaries stay well
    under M * M bytes; the CPU backend materialises them as int32, 67 MB)."""
    rng = np.random.default_rng()
    m, k, e_local, offset = moe.RANK_ROUTE_MAX, 8, 32, 32
    idx = jnp.asarray(rng.integers(0, 128, (m // k, k)), jnp.int32)
    fn = jax.jit(lambda i: sort_by_expert(i, offset, e_local))
    order, inv, _, sizes = fn(idx)
    local = np.asarray(idx).reshape(-1) - offset
    key = np.where((local >= 0) & (local < e_local), local, e_local)
    np.testing.assert_array_equal(order, np.argsort(key, kind="stable"))
    np.testing.assert_array_equal(np.asarray(inv)[np.asarray(order)], np.arange(m))
    np.testing.assert_array_equal(sizes, np.bincount(key, minlength=e_local + 1)[:e_local])
    temp = fn.lower(idx).compile().memory_analysis().temp_size_in_bytes
    assert temp < m * m // 4, temp


def test_rank_route_env_override(monkeypatch):
    """$ATOM_JAX_RANK_ROUTE_MAX=0 sorts every route (the GPU A/B of the ranked route); a bad
    value is refused."""
    idx = jax.ShapeDtypeStruct((4, 2), jnp.int32)

    def prims():
        jaxpr = jax.make_jaxpr(lambda i: sort_by_expert(i, 0, 3))(idx)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns} | {
            e.primitive.name for eqn in jaxpr.jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(eqn.params)
            for e in sub.eqns}

    assert "sort" not in prims()
    monkeypatch.setenv(moe.RANK_ROUTE_ENV, "0")
    assert "sort" in prims()
    monkeypatch.setenv(moe.RANK_ROUTE_ENV, "lots")
    with pytest.raises(ValueError, match="ATOM_JAX_RANK_ROUTE_MAX"):
        prims()


@pytest.mark.parametrize("platform,rank_max", [("cuda", None), ("rocm", None), ("cuda", 0)])
def test_moe_lowers_without_row_gather_or_scatter(platform, rank_max, monkeypatch):
    """The routed experts as the GPU runs them (Pallas kernels): the Triton kernels lower, and
    outside them no [N * k, D] gathered rows, no [N * k, I] SwiGLU pass and no scatter of rows:
    at decode sizes no sort or scatter at all; past RANK_ROUTE_MAX only the [N * k] int32
    inverse permutation is scattered (and the group sizes counted)."""
    if rank_max is not None:
        monkeypatch.setattr(moe, "RANK_ROUTE_MAX", rank_max)
    n, k, d, i, e = 256, 6, 512, 256, 8
    args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int32),
            jax.ShapeDtypeStruct((n, k), jnp.float32), jax.ShapeDtypeStruct((e, d, i), jnp.bfloat16),
            jax.ShapeDtypeStruct((e, d, i), jnp.bfloat16), jax.ShapeDtypeStruct((e, i, d), jnp.bfloat16))
    fn = jax.jit(lambda *a: routed_experts(*a, 7.0, expert_offset=3, backend="pallas"))
    with lowering_for(platform):
        text = jax.export.export(fn, platforms=(platform,), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
    assert text.count(TRITON) == 3
    shapes = {}  # primitive -> output shapes, nested jaxprs included

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.setdefault(eqn.primitive.name, []).extend(v.aval.shape for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(fn.trace(*args).jaxpr.jaxpr)
    assert (n * k, d) not in shapes.get("gather", []), shapes["gather"]
    assert "exp2" in shapes and (n * k, i) not in shapes["exp2"]  # the SwiGLU (its exp2) runs in the w3 kernel, on its tiles
    if rank_max is None:  # 1536 pairs: ranked
        assert not {"sort", "scatter", "scatter-add"} & set(shapes), shapes.keys()
        return
    assert shapes["scatter"] == [(n * k,)]  # the inverse permutation
    assert all(len(shape) == 1 for shape in shapes["scatter-add"])  # bincount's group sizes only


def test_packed_experts_through_w4a16_kernel_match_decoded():
    """FP4 experts: the W4A16 kernel (row_ids, rows past the groups unwritten) against the
    weights decoded in jnp through ragged_dot, half the experts held elsewhere."""
    rng = np.random.default_rng()
    n, k, d, i, e_all, e_local = 24, 3, 64, 64, 8, 4
    idx = jnp.asarray(_skewed_routing(rng, n, k, e_all, hot=5))
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    (w1, _), (w3, _), (w2, _) = (random_fp4_experts(rng, e_local, a, b) for a, b in ((d, i), (d, i), (i, d)))
    run = lambda backend: np.asarray(routed_experts(  # noqa: E731
        x, idx, w, w1, w3, w2, 7.0, expert_offset=e_local, backend=backend), np.float32)
    out, ref = run("pallas"), run("ragged_dot")
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_kmajor_bf16_experts_through_pallas_match_nmajor():
    """bf16 experts held K-major (`DenseKMajor`, [E, N, K]: `--expert-layout kmajor`): the Pallas
    kernel (interpreted) multiplies them with `transpose_b` and gives the [E, K, N] experts'
    output (the same products and tiles: equal to float32 rounding), half the experts held
    elsewhere, skewed routing; an XLA backend gets them transposed back."""
    from atom_jax.kernels.packed import DenseKMajor
    rng = np.random.default_rng()
    n, k, d, i, e_all, e_local = 24, 3, 64, 64, 8, 4
    idx = jnp.asarray(_skewed_routing(rng, n, k, e_all, hot=5))
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    stacks = [jnp.asarray(rng.standard_normal((e_local, a, b)) / 8, jnp.float32) for a, b in ((d, i), (d, i), (i, d))]
    k_major = [DenseKMajor(jnp.swapaxes(s, 1, 2)) for s in stacks]
    run = lambda ws, backend: np.asarray(routed_experts(  # noqa: E731
        x, idx, w, *ws, 7.0, expert_offset=e_local, backend=backend))
    ref = run(stacks, "ragged_dot")
    np.testing.assert_allclose(run(k_major, "pallas"), run(stacks, "pallas"), rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(run(k_major, "pallas"), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(run(k_major, "ragged_dot"), ref)


def test_kmajor_bf16_moe_lowers_to_the_bf16_kernel_without_transposing_experts():
    """The routed experts with `DenseKMajor` stacks lowered for cuda: the bf16 Pallas kernel (three
    Triton calls, with `transpose_b`), no XLA transpose of an expert stack."""
    from atom_jax.kernels.packed import DenseKMajor
    n, k, d, i, e = 256, 6, 512, 256, 8
    bf = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((n, d), bf), jax.ShapeDtypeStruct((n, k), jnp.int32),
            jax.ShapeDtypeStruct((n, k), jnp.float32), DenseKMajor(jax.ShapeDtypeStruct((e, i, d), bf)),
            DenseKMajor(jax.ShapeDtypeStruct((e, i, d), bf)), DenseKMajor(jax.ShapeDtypeStruct((e, d, i), bf)))
    fn = jax.jit(lambda *a: routed_experts(*a, 7.0, expert_offset=3, backend="pallas"))
    with lowering_for("cuda"):
        text = jax.export.export(fn, platforms=("cuda",), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
        jaxpr = fn.trace(*args).jaxpr.jaxpr
    assert text.count(TRITON) == 3
    transposed, weights = [], []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "transpose":
                transposed.extend(v.aval.shape for v in eqn.outvars)
            if eqn.primitive.name == "pallas_call":
                assert "grouped_gemm" in str(eqn.params["name"]) and "w4a16" not in str(eqn.params["name"])
                weights.append(eqn.invars[-2 if len(weights) == 1 else -1].aval.shape)  # the w3 call: + gate
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr)
    assert not [s for s in transposed if len(s) == 3], transposed
    assert weights == [(e, i, d), (e, i, d), (e, d, i)]  # the stacks reach the kernels as held, [E, N, K]
