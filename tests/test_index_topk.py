"""The indexer's top-k policies (models/index_topk.py) against a plain oracle: every visible
entry scored by `jnp_index_scorer`, then sorted by (score desc, entry index asc), the
documented tie rule. Small widths (monkeypatched rungs, sub-blocks, budget and loop blocks) so
one compiled step exercises several rungs, the loop fallback past the budget, sub-blocks of the
two-stage policy and visible counts of 0, 1, < k, > k, not multiples of any block; 2 indexer
heads, so relu makes exact-zero ties common. The Pallas scorer runs in interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.cache import pack_chunks
from atom_jax.kernels import sparse_indexer, topk_select
from atom_jax.models import index_topk as it
from atom_jax.models.cache_reads import NO_ENTRY, jnp_index_scorer

K, EPP, ALIGN = 8, 4, 16


@pytest.fixture
def small_widths(monkeypatch):
    """Rungs 32, 64 (128 and the capacity 208 are past the budget of 64 tokens x 64 scores),
    sub-blocks of 16, loop blocks of 48."""
    for name, value in dict(RUNG_MIN=32, RUNG_RATIO=2, SUB_BLOCK=16, SCORE_BUDGET=64 * 64,
                            MIN_OUTER_BLOCK=48, MAX_OUTER_BLOCK=48).items():
        monkeypatch.setattr(it, name, value)


def _oracle(scores, n_vis, k=K):
    """Each row's first n entries sorted by (score desc, entry index asc): the tie rule."""
    return [set(np.lexsort((np.arange(n), -s[:n]))[:k].tolist()) for s, n in zip(np.asarray(scores), n_vis)]


def _check(idx, ok, want, n_vis):
    idx, ok = np.asarray(idx), np.asarray(ok)
    for r, n in enumerate(n_vis):
        assert set(idx[r][ok[r]].tolist()) == want[r], f"token {r} ({n} visible)"
        assert np.all(idx[r][~ok[r]] == NO_ENTRY) and ok[r].sum() == min(n, K)


def _array_scorer(scores):
    """make_scorer over a fixed [T, cap] score array (columns and rows past it: zeros)."""
    t = scores.shape[0]

    def make(width, rows=None):
        pad = jnp.pad(jnp.asarray(scores), ((0, rows or 0), (0, 2 * width)))
        if rows is None:
            return lambda e0: jax.lax.dynamic_slice(pad, (0, e0), (t, width))
        return lambda e0, r0: jax.lax.dynamic_slice(pad, (r0, e0), (rows, width))

    return make


def _inputs(rng):
    """A prefill chunk of 40 tokens and 3 decode tokens of other slots in a 64-token buffer;
    each slot's page table a random permutation of the pool's pages (reuse across slots)."""
    slots, pages = 4, 52  # capacity 208 entries
    chunks = [(0, 700, np.zeros(40, np.int32), True)] + [(s, 10, np.zeros(1, np.int32), True) for s in (1, 2, 3)]
    b = {k: jnp.asarray(v) for k, v in pack_chunks(chunks, 64, slots).arrays().items()}
    page_table = jnp.asarray(np.stack([rng.permutation(pages) for _ in range(slots)]), jnp.int32)
    pool = jnp.asarray(rng.standard_normal((pages * EPP, 16)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((64, 2, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 2)), jnp.float32)
    return b, page_table, pool, q, w


def _visible_cases(rng, b):
    """Three steps' visible counts: all within the 32 rung, within 64, and past the budget
    (the loop): ragged, with 0 (padding), 1, < K and > K entries."""
    valid = np.asarray(b["valid"])
    cases = []
    for top in (32, 64, 208):
        n = rng.integers(0, top + 1, size=64).astype(np.int32)
        n[40:43] = [0, 1, K - 3]
        n[0] = top - 5
        cases.append(np.where(valid, n, 0).astype(np.int32))
    return cases


@pytest.mark.parametrize("scorer", ["jnp", "pallas"])
def test_every_policy_matches_the_oracle(small_widths, scorer):
    rng = np.random.default_rng()
    b, page_table, pool, q, w = _inputs(rng)
    cap = page_table.shape[1] * EPP
    full = jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, cap)(0)
    tiles = sparse_indexer.IndexerTiles(block_t=16, block_e=ALIGN)
    plans = {p: it.plan_topk(64, cap, K, p, align=ALIGN) for p in it.POLICIES}
    assert plans["single"].rungs == (32, 64) and plans["single"].loop_block == 48
    # rowselect: every rung to the capacity, in windows of 64, 64, 32 and 16 rows (those of 32
    # and 16 cut the 40-token prefill chunk)
    assert plans["rowselect"].rungs == (32, 64, 128, 208) and plans["rowselect"].row_chunks == (64, 64, 32, 16)

    def step(n_vis):
        def make(width, rows=None):
            if scorer == "jnp":
                return jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, width, rows)
            return sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, width, 4, tiles=tiles, interpret=True,
                                         rows=rows)
        return {p: it.index_topk(make, n_vis, K, plan) for p, plan in plans.items()}

    step = jax.jit(step)
    for n_vis in _visible_cases(rng, b):
        want = _oracle(full, n_vis)
        for policy, (idx, ok) in step(jnp.asarray(n_vis)).items():
            _check(idx, ok, want, n_vis)


def test_ties_resolve_to_the_lowest_entry_index(small_widths):
    """Scores in {0, 1, 2} (ties across sub-blocks, rungs and loop blocks, straddling the k-th
    place), and all-zero rows (relu): every policy keeps the lowest indices among equals."""
    rng = np.random.default_rng()
    t, cap = 6, 200
    scores = rng.integers(0, 3, size=(t, cap)).astype(np.float32)
    scores[1] = 0.0
    scores[4, :150] = 0.0
    make = _array_scorer(scores)
    cases = [np.array([200, 37, 0, 1, 190, 9], np.int32), np.array([30, 31, 8, 7, 3, 0], np.int32)]
    plans = [it.plan_topk(t, cap, K, p, align=ALIGN) for p in it.POLICIES]
    run = jax.jit(lambda n: [it.index_topk(make, n, K, plan) for plan in plans])
    for n_vis in cases:
        want = _oracle(scores, n_vis)
        for idx, ok in run(jnp.asarray(n_vis)):
            _check(idx, ok, want, n_vis)


def test_rowselect_windows_equal_the_loop(monkeypatch):
    """"rowselect" over windows of rows that do not divide T (37 tokens in 2 windows of 24 or 3
    of 16, the last one padded), scores in {0, 1, 2} with many exact zeros (ties straddling the k-th place
    and whole rows of zeros), ragged visible counts with 0, 1 and fewer than k entries: the
    loop's selected sets, which are the oracle's."""
    monkeypatch.setattr(it, "SCORE_BUDGET", 37 * 40)
    monkeypatch.setattr(it, "RUNG_MIN", 32)
    rng = np.random.default_rng()
    t, cap = 37, 160
    scores = (rng.integers(0, 3, size=(t, cap)) * (rng.random((t, cap)) < 0.3)).astype(np.float32)
    scores[5] = 0.0
    plan = it.plan_topk(t, cap, K, "rowselect", align=ALIGN)
    assert plan.rungs == (32, 64, 128, 160) and plan.row_chunks == (37, 24, 16, 16)
    loop = it.plan_topk(t, cap, K, "loop", align=ALIGN)
    make = _array_scorer(scores)
    run = jax.jit(lambda n: [it.index_topk(make, n, K, p) for p in (plan, loop)])
    for top in (cap, 100, 60):  # rungs 160, 128 and 64, all in windows
        n_vis = rng.integers(0, top + 1, size=t).astype(np.int32)
        n_vis[:5] = [0, 1, K - 3, top, top - 1]
        (ri, rok), (li, lok) = run(jnp.asarray(n_vis))
        want = _oracle(scores, n_vis)
        _check(ri, rok, want, n_vis)
        _check(li, lok, want, n_vis)


@pytest.mark.parametrize("prune,compact_w", [(True, 0), (True, 8), (True, 64), (True, 2048), (False, 0)])
def test_pallas_radix_select_equals_the_jnp_one(monkeypatch, prune, compact_w):
    """The Pallas selection (interpret mode; tiles of 16 entries, a width of 200 that is not a
    multiple of them; compaction tiles of 16, 8, 64 or the default 2,048, capped at the row: 256),
    pruned to the entries at or above the bound
    of 32 strided groups or over whole rows, returns exactly `radix_select`'s indices, in the same order, which hold
    the oracle's sets: scores in {0, 1, 2} with many exact zeros, a row of zeros, a row with
    no eligible entry, rows with fewer than k eligible entries, negative scores; and the same
    given each row's eligible prefix instead of -inf past it."""
    assert topk_select.NO_ENTRY == NO_ENTRY
    monkeypatch.setattr(topk_select, "PRUNE", prune)
    monkeypatch.setattr(topk_select, "COMPACT_W", compact_w)
    rng = np.random.default_rng()
    t, width = 7, 200
    scores = (rng.integers(0, 3, size=(t, width)) * (rng.random((t, width)) < 0.3)).astype(np.float32)
    scores[1] = 0.0
    scores[6] = -rng.random(width).astype(np.float32)  # negatives order below zero
    n_vis = rng.integers(0, width + 1, size=t).astype(np.int32)
    n_vis[:4] = [width, width - 1, 0, K - 3]
    live = np.arange(width)[None, :] < n_vis[:, None]
    s = jnp.asarray(np.where(live, scores, -np.inf).astype(np.float32))
    got = np.asarray(topk_select.radix_select(s, K, interpret=True, block_w=16))
    np.testing.assert_array_equal(got, np.asarray(it.radix_select(s, K)))
    _check(got, got < n_vis[:, None], _oracle(scores, n_vis), n_vis)
    # the eligible prefix given instead: what lies past it (huge scores, NaN) is never selected
    junk = jnp.asarray(np.where(live, scores, np.where(rng.random((t, width)) < 0.5, 1e9, np.nan)).astype(np.float32))
    n = jnp.asarray(n_vis)
    np.testing.assert_array_equal(np.asarray(topk_select.radix_select(junk, K, n, interpret=True, block_w=16)), got)
    np.testing.assert_array_equal(np.asarray(it.radix_select(junk, K, n)), got)
    monkeypatch.setattr(topk_select, "COMPACT_W", 24)  # not a power of two: refused before any lowering
    with pytest.raises(ValueError, match="COMPACT_W 24"):
        topk_select.radix_select(s, K, interpret=True, block_w=16)


def test_plan_follows_tokens_and_capacity():
    cap = 262144  # a 1M-token cache's CSA entries
    assert it.plan_topk(1, cap, 512, "loop") == it.TopkPlan("loop", (), 16384)  # 16 blocks: dynamic
    short = it.plan_topk(8192, 8320, 512, "loop")  # blocks of 4096 to a small capacity: 3, a static loop
    assert (short.method, short.loop_block, short.loop_trips) == ("loop", 4096, 3)
    small = it.plan_topk(16, cap, 512, "select")
    assert small.rungs == (4096, 16384, 65536, 262144) and small.loop_block == 0
    mid = it.plan_topk(512, cap, 512, "two-stage")  # 512 x 32768 scores fit the budget, 65536 not
    assert mid.rungs == (4096, 16384) and mid.loop_block == it.outer_block(cap, 512)
    assert it.plan_topk(8192, cap, 512, "single").method == "loop"  # no rung within the budget
    assert it.plan_topk(8192, cap, 512, "loop").method == "loop"
    # prefill under auto: AUTO_LARGE_POLICY, the sort-free rowselect
    assert it.plan_topk(8192, cap, 512).method == it.AUTO_LARGE_POLICY == "rowselect"
    # rowselect: every rung x2 to the capacity, each call within the budget
    pre = it.plan_topk(8192, cap, 512, "rowselect")
    assert pre.method == "rowselect" and pre.rungs == tuple(4096 << i for i in range(7)) and not pre.loop_block
    assert pre.row_chunks == (4096, 2048, 1024, 512, 256, 128, 64)
    assert it.plan_topk(600, 32768, 512, "rowselect").row_chunks[-1] == 304  # 2 windows, not 512 + 88
    assert it.plan_topk(1, 100, 100, "single").rungs == (128,)  # one rung: the capacity, aligned
    # flat: rowselect at the capacity alone, windows within the budget
    assert it.plan_topk(64, cap, 512, "flat") == it.TopkPlan("rowselect", (cap,), row_chunks=(64,))
    assert it.plan_topk(512, cap, 512, "flat").row_chunks == (64,)  # 8 windows (a static loop)
    # decode under auto: AUTO_POLICY's plan where it has one branch, else flat (no device-side branch)
    assert it.plan_topk(64, 9216 // 4, 512) == it.plan_topk(64, 9216 // 4, 512, it.AUTO_POLICY)
    for t in (1, 64, 512):
        assert it.branches_on_device(it.plan_topk(t, cap, 512, it.AUTO_POLICY))
        assert it.plan_topk(t, cap, 512) == it.plan_topk(t, cap, 512, "flat")
        assert not it.branches_on_device(it.plan_topk(t, cap, 512))
    with pytest.raises(ValueError, match="unknown indexer top-k policy"):
        it.plan_topk(1, cap, 512, "sorted")


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_policies_lower_for_gpu_at_v4_flash_dims(platform):
    """Every policy around the Pallas scorer (Triton) at a 1M-token cache's 262,144 CSA entries,
    16 decode tokens: the rung switch, the loop and the selections (rowselect's: the Pallas
    one) export for the GPU; and rowselect with the scorer's prefill tiles."""
    t, slots, epp, cap, k = 16, 16, 64, 262144, 512
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    b = {n: i32(t) for n in ("pos", "slot", "seg_start_idx", "seg_start_pos", "seg_end_pos")}
    b["valid"] = jax.ShapeDtypeStruct((t,), jnp.bool_)

    def fn(q, w, pool, pt, bb, nv):
        make = lambda width, rows=None: sparse_indexer.scorer(q, w, pool, pt, bb, nv, epp, width, slots,  # noqa: E731
                                                              rows=rows)
        prefill = lambda width, rows=None: sparse_indexer.scorer(  # noqa: E731
            q, w, pool, pt, bb, nv, epp, width, slots, tiles=sparse_indexer.PREFILL_TILES, rows=rows)
        plan = it.plan_topk(t, cap, k, "rowselect", align=sparse_indexer.PREFILL_TILES.block_e)
        return [it.index_topk(make, nv, k, it.plan_topk(t, cap, k, p), select=topk_select.radix_select)
                for p in it.POLICIES] + [it.index_topk(prefill, nv, k, plan, select=topk_select.radix_select)]

    check = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=check)(
        jax.ShapeDtypeStruct((t, 64, 128), jnp.float32), jax.ShapeDtypeStruct((t, 64), jnp.float32),
        jax.ShapeDtypeStruct((cap, 128), jnp.bfloat16), i32(slots, cap // epp), b, i32(t))
    assert "triton" in exp.mlir_module() and "topk_radix_select" in exp.mlir_module()


def test_bench_indexer_runs_every_policy_and_they_agree(tmp_path):
    """`python -m atom_jax.bench indexer` at CPU sizes (jnp scorer): every policy selects what
    the loop selects, for a decode batch and a prefill chunk."""
    import json

    from atom_jax.bench.__main__ import main

    out = tmp_path / "indexer.json"
    assert main(["indexer", "--tokens", "2,96", "--visible", "300,700", "--capacity", "1000", "--iters", "1",
                 "--scorer", "jnp", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["policy"] for r in rows} == set(it.POLICIES) and not any("error" in r for r in rows)
    assert all(r["same"] == 1.0 and r["ms"] > 0 for r in rows)
    # the Pallas scorer's paths (interpreted) beside the jnp one, on a decode batch
    assert main(["indexer", "--tokens", "3", "--visible", "300", "--capacity", "1000", "--iters", "1",
                 "--policies", "single", "--scorer", "jnp,pallas-heads,pallas-tiles", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["scorer"], r["policy"]) for r in rows] == [(s, p) for s in ("jnp", "pallas-heads", "pallas-tiles")
                                                          for p in ("loop", "single")]
    assert all(r["same"] == 1.0 and r["same_base"] == 1.0 for r in rows)


def test_bench_indexer_prefill_variants_replace_the_named_fields_only():
    """`--scorer pallas-prefill:e128:w4`: PREFILL_TILES with block_e 128 and 4 warps, the rest as
    they are; a malformed variant stops the bench before any work."""
    from atom_jax.bench.indexer import prefill_variant

    got = prefill_variant("pallas-prefill:e128:w4")
    assert (got.block_e, got.num_warps) == (128, 4)
    assert got.block_t == sparse_indexer.PREFILL_TILES.block_t and prefill_variant("pallas-prefill") == \
        sparse_indexer.PREFILL_TILES
    for bad in ("pallas-prefill:x4", "pallas-prefill:e", "pallas-prefil:e128", "pallas-prefill:w4x"):
        with pytest.raises(SystemExit, match="pallas-prefill"):
            prefill_variant(bad)


# ---- compiled on a GPU (skipped on CPU): `python -m pytest -q -m gpu tests/test_index_topk.py`
# Lean on purpose (each rung is its own Triton kernels to compile): RUNG_MIN is raised so a step
# has 2-3 rungs, and the loop's selections at V4-Flash dims are compiled once for every policy.
@pytest.fixture(scope="module")
def flash_decode_step():
    """16 decode tokens of 16 slots at V4-Flash indexer dims (64 heads x 128, bf16 keys, k 512),
    up to 65,536 visible entries through permuted pages, and the loop's selections over the
    Pallas scorer's scores."""
    rng = np.random.default_rng()
    t, k, epp, pages = 16, 512, 64, 1024  # capacity 65536 entries
    chunks = [(s, int(rng.integers(0, 4 * pages * epp - 1)), np.zeros(1, np.int32), True) for s in range(t)]
    b = {n: jnp.asarray(v) for n, v in pack_chunks(chunks, t, t).arrays().items()}
    page_table = jnp.asarray(np.stack([rng.permutation(pages) for _ in range(t)]), jnp.int32)
    pool = jnp.asarray(rng.standard_normal((pages * epp, 128)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((t, 64, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, 64)) / 64, jnp.float32)
    n_vis = jnp.asarray((np.asarray(b["pos"]) + 1) // 4, jnp.int32)
    cap = pages * epp
    make = lambda width, rows=None: sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, epp, width, t,  # noqa: E731
                                                          rows=rows)
    li, lok = jax.jit(lambda n: it.index_topk(make, n, k, it.plan_topk(t, cap, k, "loop")))(n_vis)
    loop = [set(np.asarray(li)[r][np.asarray(lok)[r]].tolist()) for r in range(t)]
    return make, n_vis, cap, k, loop


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["single", "two-stage", "select", "rowselect", "flat"])
def test_compiled_policies_at_v4_flash_dims(policy, flash_decode_step, monkeypatch):
    """The Pallas scorer (and for the sort-free policies the Pallas selection): each policy
    selects exactly what the loop selects from the same kernel scores; and on scores in
    {0, 1, 2} at 262K entries exactly the oracle's entries."""
    make, n_vis, cap, k, loop = flash_decode_step
    t = n_vis.shape[0]
    monkeypatch.setattr(it, "RUNG_MIN", 16384)  # rungs 16K, 64K (x2 for rowselect: 16K, 32K, 64K)
    pi, pok = jax.jit(lambda n: it.index_topk(make, n, k, it.plan_topk(t, cap, k, policy),
                                              select=topk_select.radix_select))(n_vis)
    for r in range(t):
        assert set(np.asarray(pi)[r][np.asarray(pok)[r]].tolist()) == loop[r], f"token {r}"

    rng = np.random.default_rng()
    cap = 262144
    monkeypatch.setattr(it, "RUNG_MIN", 65536)  # rungs 64K, 256K (rowselect: 64K, 128K, 256K)
    scores = jnp.asarray(rng.integers(0, 3, size=(t, cap)), jnp.float32)
    n_vis = np.asarray(rng.integers(0, cap + 1, size=t), np.int32)
    n_vis[:4] = [0, 1, 300, 70000]
    idx, ok = jax.jit(lambda n: it.index_topk(_array_scorer(scores), n, k, it.plan_topk(t, cap, k, policy),
                                              select=topk_select.radix_select))(jnp.asarray(n_vis))
    want = _oracle(scores, n_vis, k)
    for r in range(t):
        assert set(np.asarray(idx)[r][np.asarray(ok)[r]].tolist()) == want[r]


@pytest.mark.gpu
@pytest.mark.parametrize("prefill_tiles", [False, True])
def test_compiled_rowselect_at_prefill(prefill_tiles, monkeypatch):
    """A 2,048-token prefill chunk at V4-Flash indexer dims over up to 16K visible entries
    (windows of 2,048 / 1,024 rows at the 8K / 16K rungs), the Pallas scorer with its default or
    prefill tiles: rowselect with the Pallas selection selects exactly the loop's entries from
    the same kernel's scores."""
    monkeypatch.setattr(it, "RUNG_MIN", 8192)  # two rungs (the 4K one adds compiles, no coverage)
    rng = np.random.default_rng()
    t, k, epp, pages = 2048, 512, 64, 256  # capacity 16384 entries
    b = {n: jnp.asarray(v) for n, v in pack_chunks([(0, 4 * pages * epp - t, np.zeros(t, np.int32), True)], t,
                                                   1).arrays().items()}
    page_table = jnp.asarray(rng.permutation(pages)[None], jnp.int32)
    pool = jnp.asarray(rng.standard_normal((pages * epp, 128)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((t, 64, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, 64)) / 64, jnp.float32)
    n_vis = jnp.asarray((np.asarray(b["pos"]) + 1) // 4, jnp.int32)
    tiles = sparse_indexer.PREFILL_TILES if prefill_tiles else sparse_indexer.TILES
    make = lambda width, rows=None: sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, epp, width, 1,  # noqa: E731
                                                          tiles=tiles, rows=rows)
    plans = [it.plan_topk(t, pages * epp, k, p, align=tiles.block_e) for p in ("loop", "rowselect")]
    assert plans[1].rungs == (8192, 16384) and plans[1].row_chunks == (2048, 1024)
    run = jax.jit(lambda n: [it.index_topk(make, n, k, p, select=topk_select.radix_select) for p in plans])
    (li, lok), (ri, rok) = run(n_vis)
    li, lok, ri, rok = (np.asarray(x) for x in (li, lok, ri, rok))
    for r in range(t):
        assert set(ri[r][rok[r]].tolist()) == set(li[r][lok[r]].tolist()), f"token {r}"


def test_static_trip_loop_equals_the_dynamic_one_without_a_while():
    """running_topk with a static trip count (to the capacity) selects what the loop over the
    longest visible prefix selects, and traces to no data-dependent while loop (a GPU while
    loop copies its predicate to the host each iteration)."""
    from atom_jax.models.cache_reads import running_topk

    rng = np.random.default_rng()
    t, cap, block, k = 6, 200, 48, K
    # rounding: ties; + 0.0 turns -0.0 into 0.0 (top_k orders -0.0 below 0.0, the oracle ties them)
    scores = (np.round(rng.standard_normal((t, cap)), 1) + 0.0).astype(np.float32)
    make = lambda e0: jax.lax.dynamic_slice_in_dim(  # noqa: E731
        jnp.pad(jnp.asarray(scores), ((0, 0), (0, block))), e0, block, axis=1)
    trips = -(-cap // block)
    static = jax.jit(lambda n: running_topk(make, n, k, block, trips))
    dynamic = jax.jit(lambda n: running_topk(make, n, k, block))
    for n_vis in (rng.integers(0, cap + 1, t).astype(np.int32), np.array([cap, 0, 1, 47, 48, 49], np.int32)):
        (si, so), (di, do) = static(jnp.asarray(n_vis)), dynamic(jnp.asarray(n_vis))
        np.testing.assert_array_equal(np.asarray(so), np.asarray(do))
        np.testing.assert_array_equal(np.where(so, si, -1), np.where(do, di, -1))
        _check(si, so, _oracle(scores, n_vis), n_vis)
    n = jnp.zeros(t, jnp.int32)
    assert "while" not in str(jax.make_jaxpr(lambda n: running_topk(make, n, k, block, trips))(n))
    assert "while" in str(jax.make_jaxpr(lambda n: running_topk(make, n, k, block))(n))


def test_single_trip_loop_folds_no_index_constant():
    """A static trip count of 1 (the capacity fits one block: 8K-token prefill steps on the GPU
    path) lets XLA unroll running_topk's loop. The merge must not then hold an all-constant
    [T, k + block] index array (the initial places beside the block's iota), which XLA's
    constant folding turned into a literal per CSA layer (88 MB at 8192 tokens, 1-2 s of
    compile each); and the selection stays the oracle's."""
    from atom_jax.models.cache_reads import running_topk
    from atom_jax.trace.hlo import large_constants

    rng = np.random.default_rng()
    t, block, k = 512, 256, K
    scores = (np.round(rng.standard_normal((t, block)), 1) + 0.0).astype(np.float32)  # ties, no -0.0
    fn = jax.jit(lambda s, n: running_topk(lambda e0: s, n, k, block, trips=1))
    n_vis = rng.integers(0, block + 1, t).astype(np.int32)
    n_vis[:3] = [0, 1, block]
    args = (jnp.asarray(scores), jnp.asarray(n_vis))
    big = large_constants(fn.lower(*args).compile().as_text(), min_bytes=4 * t * block)
    assert not big, big  # before the fix: s32[512,264] pad(iota)
    idx, ok = fn(*args)
    _check(idx, ok, _oracle(scores, n_vis), n_vis)
