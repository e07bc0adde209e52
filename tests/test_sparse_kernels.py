"""The long-context kernels (Pallas, interpret mode on CPU) against the jnp reference path on
fresh random inputs: several chunks of different sequences in one packed buffer, ragged
lengths not multiples of the compression ratio, chunks starting inside compression windows,
page tables with holes (columns past a sequence's pages point at other sequences' pages) and
pages reused across slots' histories."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.cache import pack_chunks
from atom_jax.kernels import sparse_attention, sparse_indexer
from atom_jax.models.cache_reads import NO_ENTRY, jnp_index_scorer, running_topk, visible_counts
from atom_jax.models.index_topk import outer_block

RATIO = 4
EPP = 4  # entries per page at RATIO: page_tokens 16


def _batch(rng, size=64, max_start=150, page_tokens=16, scale=1):
    """A packed buffer of 3 prefill chunks (ragged lengths, starts inside compression windows)
    and 2 decode tokens. Each slot's page table holds distinct pages for the positions it has;
    its other columns are holes pointing at pages other slots own (stale rows of reused pages),
    which no kernel may read."""
    n_slots = 6
    max_pages = -(-(max_start + 17 * scale) // page_tokens)
    starts = [int(rng.integers(0, max_start)) for _ in range(5)]
    lens = [int(rng.integers(5, 17)) * scale, int(rng.integers(1, 12)) * scale, int(rng.integers(3, 9)) * scale, 1, 1]
    slots = rng.permutation(n_slots)[:5]
    chunks = [(int(s), st, np.zeros(n, np.int32), True) for s, st, n in zip(slots, starts, lens)]
    b = pack_chunks(chunks, size, n_slots)
    free = list(rng.permutation(n_slots * max_pages))
    page_table = rng.integers(0, n_slots * max_pages, size=(n_slots, max_pages)).astype(np.int32)
    for s, st, n in zip(slots, starts, lens):
        used = -(-(st + n) // page_tokens)
        page_table[s, :used] = [free.pop() for _ in range(used)]
    return {k: jnp.asarray(v) for k, v in b.arrays().items()}, jnp.asarray(page_table), n_slots


def _topk_oracle(scores, n_vis, k):
    """Sort by (score desc, entry index asc) in numpy: the documented tie rule."""
    out = []
    for s, n in zip(np.asarray(scores), np.asarray(n_vis)):
        order = sorted(range(n), key=lambda e: (-s[e], e))[:k]
        out.append(set(order))
    return out


@pytest.mark.parametrize("path", sparse_indexer.SCORER_PATHS)
def test_indexer_kernel_and_running_topk_match_reference(path):
    """Each scorer path; "auto" (heads_max 8, tiles of 16) sends the decode tokens and the short
    tiles of the prefill chunks to the heads path (one dot of all heads per token) and the
    longer tiles to the tokens-as-rows path."""
    rng = np.random.default_rng()
    b, page_table, n_slots = _batch(rng)
    t, heads, dim = b["pos"].shape[0], 2, 16
    pool = jnp.asarray(rng.standard_normal((page_table.size * EPP, dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((t, heads, dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, heads)), jnp.float32)
    n_vis = visible_counts(b, RATIO)
    cap = page_table.shape[1] * EPP
    tiles = sparse_indexer.IndexerTiles(block_t=16, block_e=16, heads_max=8)
    ref = jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, 32)
    ker = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, 32, 6, tiles=tiles, interpret=True, path=path)
    live = np.arange(32)[None, :] + 16 < np.asarray(n_vis)[:, None]
    np.testing.assert_allclose(np.where(live, ker(16), 0), np.where(live, ref(16), 0), rtol=1e-5, atol=1e-5)
    # full scores of every visible entry (2 heads: relu makes exact-zero ties common)
    full = jnp.concatenate([ref(e0) for e0 in range(0, cap, 32)], axis=1)
    oracle = _topk_oracle(full, n_vis, 8)
    for scorer in (ref, ker):
        idx, ok = running_topk(scorer, n_vis, 8, 32)
        idx, ok = np.asarray(idx), np.asarray(ok)
        for r in range(t):
            assert set(idx[r][ok[r]].tolist()) == oracle[r], f"token {r}"
            assert np.all(idx[r][~ok[r]] == NO_ENTRY)


def test_prefill_tiles_only_from_their_token_count(monkeypatch):
    assert sparse_indexer.tiles_for_step(sparse_indexer.PREFILL_MIN_TOKENS) is sparse_indexer.PREFILL_TILES
    assert sparse_indexer.tiles_for_step(sparse_indexer.PREFILL_MIN_TOKENS - 1) is sparse_indexer.TILES
    monkeypatch.setattr(sparse_indexer, "PREFILL_MIN_TOKENS", 0)  # 0: never
    assert sparse_indexer.tiles_for_step(8192) is sparse_indexer.TILES
    monkeypatch.setattr(sparse_indexer, "PREFILL_MIN_TOKENS", 513)
    assert sparse_indexer.tiles_for_step(512) is sparse_indexer.TILES
    assert sparse_indexer.tiles_for_step(513) is sparse_indexer.PREFILL_TILES


def _check_scorer_and_row_windows(tiles, block: int | None = None, path: str = "auto"):
    """The Pallas scorer (interpret mode) with `tiles` over `block` entries (default one
    block_e) scores what the jnp scorer scores, over the whole buffer and over windows of 24
    rows (the "rowselect" calls: chunk ranges clipped to the window, rows past T unwritten)."""
    rng = np.random.default_rng()
    b, page_table, n_slots = _batch(rng, max_start=600)
    t, heads, dim = b["pos"].shape[0], 2, 16
    pool = jnp.asarray(rng.standard_normal((page_table.size * EPP, dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((t, heads, dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, heads)), jnp.float32)
    n_vis = visible_counts(b, RATIO)
    block = block or tiles.block_e
    live = np.arange(block)[None, :] < np.asarray(n_vis)[:, None]
    ref = np.asarray(jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, block)(0))
    ker = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, block, n_slots, tiles=tiles, interpret=True,
                                path=path)
    np.testing.assert_allclose(np.where(live, ker(0), 0), np.where(live, ref, 0), rtol=1e-5, atol=1e-5)
    win = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, block, n_slots, tiles=tiles, interpret=True,
                                rows=24, path=path)
    for r0 in (0, 24, 48):  # the last window: 16 rows of the buffer, 8 past it
        n = min(24, t - r0)
        got = np.asarray(win(0, r0))[:n]
        np.testing.assert_allclose(np.where(live[r0:r0 + n], got, 0), np.where(live[r0:r0 + n], ref[r0:r0 + n], 0),
                                   rtol=1e-5, atol=1e-5)
    return page_table.shape[1] * EPP


def test_prefill_tiles_and_row_windows_match_reference():
    """The candidate prefill tiles (sparse_indexer.PREFILL_TILES: 32 tokens x 256 entries per
    program) score what the jnp scorer scores, whole buffer and row windows."""
    _check_scorer_and_row_windows(sparse_indexer.PREFILL_TILES)


@pytest.mark.parametrize("path", ["tiles", "heads"])
def test_scorer_looping_over_sub_blocks_matches_reference(path, monkeypatch):
    """Calls of decode-sized steps past MAX_PROGRAMS programs (here 4): few programs along the entries,
    each scoring its sub-blocks j, j + stride, ... up to its tile's longest visible prefix, over
    the whole buffer and over windows of rows; the same scores as the jnp scorer. (The buffer's
    capacity is 39 pages x 4 entries: 10 sub-blocks of 16 x 10 / 8 work items, so ONE program
    along the entries scores them all.)"""
    monkeypatch.setattr(sparse_indexer, "MAX_PROGRAMS", 4)
    assert sparse_indexer.score_programs(12, 1, 1) == 4 and sparse_indexer.score_programs(12, 3, 64) == 1
    assert sparse_indexer.score_programs(2, 2, 64) == 2 and sparse_indexer.score_programs(12, 3, 513) == 12
    assert _check_scorer_and_row_windows(sparse_indexer.IndexerTiles(block_t=16, block_e=16), 160, path) == 156


@pytest.mark.parametrize("t,heads_as", [(1, "cols"), (8, "cols"), (8, "rows")])
def test_heads_scorer_on_decode_steps_matches_oracle(t, heads_as):
    """The heads path on decode steps (one token per chunk; T = 1, and 5 tokens of
    different slots plus 3 padding rows): 3 heads (padded to the dots' 16 rows), ragged visible
    counts, page tables of scattered pages; its scores match the jnp scorer and the one-call
    top-k of them is the plain top-k over every visible entry (lowest index among ties)."""
    from atom_jax.models import index_topk as it

    rng = np.random.default_rng()
    n_slots, pages, heads, dim, k = 6, 24, 3, 16, 8
    starts = [int(rng.integers(0, 4 * EPP * pages)) for _ in range(min(t, 5))]
    starts[0] = 4 * EPP * pages - 1  # the whole page table visible
    slots = rng.permutation(n_slots)[: len(starts)]
    b = {n: jnp.asarray(v) for n, v in pack_chunks([(int(s), p, np.zeros(1, np.int32), True)
                                                    for s, p in zip(slots, starts)], t, n_slots).arrays().items()}
    page_table = jnp.asarray(np.stack([rng.permutation(2 * pages)[:pages] for _ in range(n_slots)]), jnp.int32)
    pool = jnp.asarray(rng.standard_normal((2 * pages * EPP, dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((t, heads, dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, heads)), jnp.float32)
    n_vis = visible_counts(b, RATIO)
    cap = pages * EPP
    tiles = sparse_indexer.IndexerTiles(block_t=16, block_e=16, heads_as=heads_as)
    ker = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, cap, n_slots, tiles=tiles, interpret=True,
                                path="heads")
    ref = jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, cap)(0)
    live = np.arange(cap)[None, :] < np.asarray(n_vis)[:, None]
    got = np.asarray(ker(0))
    np.testing.assert_allclose(np.where(live, got, 0), np.where(live, ref, 0), rtol=1e-5, atol=1e-5)
    idx, ok = it.index_topk(lambda width: ker, n_vis, k, it.TopkPlan("single", (cap,)))
    idx, ok = np.asarray(idx), np.asarray(ok)
    for r, want in enumerate(_topk_oracle(ref, n_vis, k)):
        assert set(idx[r][ok[r]].tolist()) == want, f"token {r}"


def test_running_topk_ties_go_to_the_lowest_entry_index():
    """All-equal scores across several blocks: the k lowest visible indices, in index order."""
    n_vis = jnp.asarray([37, 5, 0, 64], jnp.int32)
    zeros = lambda e0: jnp.zeros((4, 16), jnp.float32)  # noqa: E731
    idx, ok = running_topk(zeros, n_vis, 8, 16)
    expect = [list(range(8)), list(range(5)), [], list(range(8))]
    assert [np.asarray(i)[np.asarray(o)].tolist() for i, o in zip(idx, ok)] == expect


def _attention_inputs(rng, kind, dtype=jnp.float32, heads=4, d=32, win=8, k=6, ratio=RATIO, **batch):
    b, page_table, n_slots = _batch(rng, **batch)
    t = b["pos"].shape[0]
    q = jnp.asarray(rng.standard_normal((t, heads, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((t, d)), dtype)
    ring_kv = jnp.asarray(rng.standard_normal((n_slots, win, d)), dtype)
    # each slot's ring holds the window before its chunk start (position -1 where empty)
    ring_pos = np.full((n_slots, win), -1, np.int32)
    for s, st in zip(np.asarray(b["slot"]), np.asarray(b["seg_start_pos"])):
        for p in range(max(0, st - win), st):
            ring_pos[s, p % win] = p
    epp = batch.get("page_tokens", 16) // ratio
    pool = jnp.asarray(rng.standard_normal((page_table.size * epp, d)), dtype)
    n_vis = visible_counts(b, ratio)
    sel = None
    if kind == "csa":
        sel = np.full((t, k), NO_ENTRY, np.int32)
        for r, n in enumerate(np.asarray(n_vis)):
            pick = rng.permutation(n)[:k]
            sel[r, : len(pick)] = pick
        sel = jnp.asarray(sel)
    sinks = jnp.asarray(rng.standard_normal(heads), jnp.float32)
    args = dict(pool=None if kind == "sliding" else pool, page_table=page_table, epp=epp,
                n_visible=None if kind == "sliding" else n_vis, selected=sel)
    return b, q, kv, ring_kv, jnp.asarray(ring_pos), sinks, args


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa", "hca-split", "csa-split", "sliding-split", "csa-noprefetch",
                                  "hca-split-noprefetch", "csa-dv", "hca-split-dv", "sliding-dv", "csa-transpose",
                                  "hca-split-transpose", "csa-chunks", "sliding-window1",
                                  "hca-split-transpose-chunks-rows-window1", "sliding-fast",
                                  "csa-transpose-chunks-rows-fast", "hca-split-window1-fast", "sliding-exp2",
                                  "hca-split-transpose-chunks-exp2", "csa-transpose-chunks-rows-fast-exp2",
                                  "hca-lazy", "csa-transpose-chunks-exp2-lazy", "sliding-split-transpose-lazy",
                                  "sliding-fast2", "csa-fast2"])
def test_attention_kernel_matches_reference(kind):
    """-split: decode's split of the entries over 3 programs per token, the window (2 blocks of 4
    keys, partly the chunk's rows, partly the ring) counted by split 0 alone, in every mode.
    -noprefetch: the entries' loop without loading the next block ahead (AttentionTiles.prefetch).
    -dv: the value dim in 2 column blocks, one program each (AttentionTiles.dv_split; with -split,
    the partial softmax statistics written by column block 0 alone). -transpose: scores and
    accumulator transposed (AttentionTiles.transpose; with -split, the partial states stored
    through transposed indices). -chunks: q, keys and accumulator in 2 column pieces
    (AttentionTiles.dim_chunks). -rows: the entries' loop carries the next block's row addresses
    instead of its keys (AttentionTiles.prefetch_rows). -window1: the window's keys in one load
    from the ring's rows then the chunk's (AttentionTiles.one_window_load). -fast: tokens whose whole
    window (4 positions here) lies in their chunk load it from the chunk's rows alone
    (AttentionTiles.window_fast; -fast2: in the sliding kernel alone); the buffer holds such tokens and
    others (chunk starts, decode).
    -exp2: the softmax in base 2 (AttentionTiles.exp2; with -split, the partial maxima stored back in
    natural-log units for the merge). -lazy: the denominator kept per score position and summed over
    the keys after the loop (AttentionTiles.lazy_sum)."""
    from atom_jax.models.cached_attention import reference_attend

    rng = np.random.default_rng()
    fast = "-fast" in kind
    b, q, kv, ring_kv, ring_pos, sinks, args = _attention_inputs(rng, kind.split("-")[0], win=4 if fast else 8)
    if fast:  # both branches taken: whole window in the chunk, and not
        valid = np.asarray(b["valid"])
        inside = (np.asarray(b["pos"]) - 3 >= np.asarray(b["seg_start_pos"]))[valid]
        assert inside.any() and not inside.all()
    scale = q.shape[-1] ** -0.5
    split = "-split" in kind
    rows = "-rows" in kind
    tiles = sparse_attention.AttentionTiles(block_h=4, block_k=4 if split else 16,
                                            prefetch="noprefetch" not in kind and not rows,
                                            dv_split=2 if "-dv" in kind else 1, transpose="-transpose" in kind,
                                            dim_chunks=2 if "-chunks" in kind else 1, prefetch_rows=rows,
                                            one_window_load="-window1" in kind,
                                            window_fast=2 if "-fast2" in kind else int(fast),
                                            exp2="-exp2" in kind, lazy_sum="-lazy" in kind)
    splits = 3 if split else 1
    out = sparse_attention.attend(q, kv, ring_kv, ring_pos, b, sinks, scale, tiles=tiles, interpret=True,
                                  splits=splits, **args)
    ref = reference_attend(q, kv, ring_kv, ring_pos, b, sinks, scale, **args)
    valid = np.asarray(b["valid"])
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)


def _rope_case(rng, q, rope_dim=8):
    """cos/sin [T, R/2] of random positions and q scaled per head (so the norm matters)."""
    t = q.shape[0]
    ang = rng.uniform(0, 100, (t, rope_dim // 2)).astype(np.float32)
    q = q * jnp.asarray(rng.uniform(0.1, 10, q.shape[:2])[..., None], q.dtype)
    return q, (jnp.cos(ang), jnp.sin(ang))


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa-transpose-chunks", "hca-split-transpose-chunks",
                                  "sliding-chunks", "csa-dv", "hca-norope-chunks"])
def test_fused_query_norm_and_rope_match_the_jnp_math(kind):
    """attend(..., rope=(cos, sin), norm_eps) with AttentionTiles.fuse_rope (q's per-head RMS norm and
    RoPE on its loaded rows, the output's inverse RoPE on the accumulator piece through the permutation
    dot; -split and -dv: that one in jnp after the kernel) equals models/layers' rms_norm + apply_rope,
    the kernel, and the inverse apply_rope; -chunks: the rope columns in the last of 4 pieces (16 wide);
    -norope: no norm (norm_eps None)."""
    from atom_jax.models.cached_attention import reference_attend

    rng = np.random.default_rng()
    b, q, kv, ring_kv, ring_pos, sinks, args = _attention_inputs(rng, kind.split("-")[0], d=64)
    q, (cos, sin) = _rope_case(rng, q)
    scale, eps = q.shape[-1] ** -0.5, None if "-norope" in kind else 1e-6
    split = "-split" in kind
    tiles = sparse_attention.AttentionTiles(block_h=4, block_k=4 if split else 16, prefetch=False,
                                            dv_split=2 if "-dv" in kind else 1, transpose="-transpose" in kind,
                                            dim_chunks=4 if "-chunks" in kind else 1, fuse_rope=True)
    out = sparse_attention.attend(q, kv, ring_kv, ring_pos, b, sinks, scale, tiles=tiles, interpret=True,
                                  splits=3 if split else 1, rope=(cos, sin), norm_eps=eps, **args)
    ref = reference_attend(q, kv, ring_kv, ring_pos, b, sinks, scale, rope=(cos, sin), norm_eps=eps, **args)
    valid = np.asarray(b["valid"])
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)
    # the same call without the fusion (the jnp passes around the kernel) agrees too
    plain = sparse_attention.attend(q, kv, ring_kv, ring_pos, b, sinks, scale, interpret=True,
                                    tiles=dataclasses.replace(tiles, fuse_rope=False), splits=3 if split else 1,
                                    rope=(cos, sin), norm_eps=eps, **args)
    np.testing.assert_allclose(np.asarray(plain)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_kernels_lower_for_gpu_at_v4_flash_dims(platform):
    """The Triton lowering (the portable default) of both kernels at V4-Flash head dims, bf16,
    for each attention mode; exported on CPU, so this catches lowering errors on every run."""
    t, slots, pages, epp = 32, 4, 8, 32
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    b = {k: i32(t) for k in ("pos", "slot", "seg_start_idx", "seg_start_pos", "seg_end_pos")}
    b["valid"] = jax.ShapeDtypeStruct((t,), jnp.bool_)
    check = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def export(fn, *args):
        exp = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=check)(*args)
        assert "triton" in exp.mlir_module()

    def attn(sel, splits=None, tiles=None, rope=False):
        def fn(q, kv, ring, rpos, bb, sinks, pool, pt, nv, cos, sin, *s):
            return sparse_attention.attend(q, kv, ring, rpos, bb, sinks, 0.04, pool=pool, page_table=pt, epp=epp,
                                           n_visible=nv, selected=s[0] if s else None, splits=splits, tiles=tiles,
                                           rope=(cos, sin) if rope else None, norm_eps=1e-6)
        args = [bf(t, 64, 512), bf(t, 512), bf(slots, 128, 512), i32(slots, 128), b,
                jax.ShapeDtypeStruct((64,), jnp.float32), bf(slots * pages * epp, 512), i32(slots, pages), i32(t),
                *[jax.ShapeDtypeStruct((t, 32), jnp.float32)] * 2]
        export(fn, *args, *([i32(t, 512)] if sel else []))

    attn(sel=True)
    attn(sel=False)  # t = 32: decode's split HCA entries
    attn(sel=False, splits=1)
    dv2 = sparse_attention.AttentionTiles(dv_split=2)  # the value dim over 2 programs: CSA, decode's split HCA
    attn(sel=True, tiles=dv2)
    attn(sel=False, tiles=dv2)
    tr = sparse_attention.AttentionTiles(64, 128, 8, 1, prefetch=False, transpose=True, dim_chunks=4,
                                         prefetch_rows=True, one_window_load=True)
    attn(sel=True, tiles=tr)  # S^T, O^T in 4 column pieces, row addresses a step ahead, one window load: CSA,
    attn(sel=False, tiles=tr)  # decode's split HCA
    attn(sel=True, tiles=sparse_attention.AttentionTiles(dim_chunks=4))  # the default's dots in 4 column pieces
    fused = dataclasses.replace(sparse_attention.TILES, fuse_rope=True)  # q's norm and RoPE, the output's inverse
    attn(sel=True, tiles=fused, rope=True)  # RoPE in the kernel (the permutation dot): CSA, decode's split HCA
    attn(sel=False, tiles=fused, rope=True)
    attn(sel=False, splits=1, tiles=dataclasses.replace(fused, transpose=False), rope=True)
    export(lambda q, kv, ring, rpos, bb, sinks: sparse_attention.attend(q, kv, ring, rpos, bb, sinks, 0.04),
           bf(t, 64, 512), bf(t, 512), bf(slots, 128, 512), i32(slots, 128), b, jax.ShapeDtypeStruct((64,), jnp.float32))
    for path, heads, heads_as in (("auto", 64, "cols"), ("tiles", 64, "cols"), ("heads", 64, "rows"),
                                  ("heads", 2, "cols")):  # auto: both paths' code
        tiles = sparse_indexer.IndexerTiles(heads_as=heads_as)
        export(lambda q, w, pool, pt, bb, nv: sparse_indexer.block_scores(q, w, pool, pt, bb, nv, 0, epp, 4096, slots,
                                                                          tiles=tiles, path=path),
               jax.ShapeDtypeStruct((t, heads, 128), jnp.float32), jax.ShapeDtypeStruct((t, heads), jnp.float32),
               bf(slots * pages * epp, 128), i32(slots, pages), b, i32(t))


# ---- compiled on a GPU (skipped on CPU): `python -m pytest -q -m gpu tests/test_sparse_kernels.py`
V4 = dict(heads=64, d=512, win=128, k=512, size=1024, max_start=40000, page_tokens=256, scale=16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa", "hca-split", "csa-dv", "hca-split-dv", "hca-t", "csa-t",
                                  "hca-split-t", "sliding-t", "sliding-f", "hca-f", "csa-f", "hca-split-f"])
def test_compiled_attention_kernel_at_v4_flash_dims(kind):
    """bf16 in, float32 accumulate, against the jnp reference in float32 (positions to 40K);
    hca-split: the HCA entries shared out to 16 programs per token, as decode does; -dv: the value
    dim in 2 column blocks (AttentionTiles.dv_split), 64x32x8, 2 stages, no prefetch; -t: scores
    and accumulator transposed in 4 column pieces, the next block's row addresses carried, the
    window in one load (AttentionTiles transpose, dim_chunks 4, prefetch_rows, one_window_load),
    64x128x8, 1 stage; -f: the kernel's TILES with fuse_rope, q given as projected (the reference gets it
    normed and roped by models/layers' math in float32, and its output de-rotated)."""
    from atom_jax.models.cached_attention import reference_attend

    rng = np.random.default_rng()
    b, q, kv, ring_kv, ring_pos, sinks, args = _attention_inputs(
        rng, kind.split("-")[0], jnp.bfloat16, ratio=4 if kind.startswith("csa") else 128, **V4)
    scale = q.shape[-1] ** -0.5
    splits = 16 if "-split" in kind else None
    tiles = sparse_attention.AttentionTiles(64, 32, 8, 2, prefetch=False, dv_split=2) if "-dv" in kind else \
        sparse_attention.AttentionTiles(64, 128, 8, 1, prefetch=False, transpose=True, dim_chunks=4,
                                        prefetch_rows=True, one_window_load=True) if kind.endswith("-t") else None
    fused = kind.endswith("-f")
    rope, q = ((None, q) if not fused else _rope_case(rng, q, 64)[::-1])
    if fused:
        tiles = dataclasses.replace(sparse_attention.TILES, fuse_rope=True)
    out = jax.jit(lambda *a: sparse_attention.attend(*a, scale, splits=splits, tiles=tiles, rope=rope, norm_eps=1e-6,
                                                     **args))(q, kv, ring_kv, ring_pos, b, sinks)
    f32 = lambda a: a.astype(jnp.float32) if getattr(a, "dtype", None) == jnp.bfloat16 else a  # noqa: E731
    # jitted: eager, each of the reference's ops would be its own GPU compile
    arrays = {k: v for k, v in args.items() if k != "epp"}

    ref = jax.jit(lambda a, kw: reference_attend(*map(f32, a[:3]), *a[3:], scale, epp=args["epp"], rope=rope,
                                                 norm_eps=1e-6, **{k: f32(v) for k, v in kw.items()}))(
        (q, kv, ring_kv, ring_pos, b, sinks), arrays)
    valid = np.asarray(b["valid"])
    out, ref = np.asarray(out, np.float32)[valid], np.asarray(ref)[valid]
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-2


@pytest.fixture(scope="module")
def flash_indexer_case():
    """1024 tokens at V4-Flash indexer dims (64 heads x 128 dims, bf16 keys, positions to 40K)
    and the float32 jnp scorer's block scores and running top-512, computed once for every
    scorer path."""
    rng = np.random.default_rng()
    b, page_table, _ = _batch(rng, size=1024, max_start=40000, page_tokens=256, scale=16)
    t, epp = b["pos"].shape[0], 64
    pool = jnp.asarray(rng.standard_normal((page_table.size * epp, 128)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((t, 64, 128)), jnp.bfloat16).astype(jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, 64)) / 64, jnp.float32)
    n_vis = visible_counts(b, 4)
    block = outer_block(page_table.shape[1] * epp, t)
    ref = jnp_index_scorer(q, w, pool, page_table, b["slot"], epp, block)
    ri, rok = jax.jit(lambda: running_topk(ref, n_vis, 512, block))()
    inputs = (q, w, pool, page_table, b, n_vis, epp, block)
    return inputs, np.asarray(jax.jit(ref)(0)), (np.asarray(ri), np.asarray(rok))


@pytest.mark.gpu
@pytest.mark.parametrize("path", sparse_indexer.SCORER_PATHS)
def test_compiled_indexer_at_v4_flash_dims(path, flash_indexer_case):
    """64 heads x 128 dims, bf16 keys: block scores match the float32 scorer; the running top-k
    of 512 picks nearly the same entries (bf16 rounding may swap near-ties). Each scorer path."""
    (q, w, pool, page_table, b, n_vis, epp, block), want, (ri, rok) = flash_indexer_case
    ker = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, epp, block, 6, path=path)
    live = np.arange(block)[None, :] < np.asarray(n_vis)[:, None]
    got = np.asarray(jax.jit(ker)(0))
    assert np.linalg.norm(np.where(live, got - want, 0)) / np.linalg.norm(np.where(live, want, 0)) < 1e-3
    ki, kok = (np.asarray(x) for x in jax.jit(lambda: running_topk(ker, n_vis, 512, block))())
    for r in np.flatnonzero(np.asarray(b["valid"])):
        a, c = set(ki[r][kok[r]].tolist()), set(ri[r][rok[r]].tolist())
        assert len(a) == len(c) and len(a & c) >= 0.98 * len(c)


@pytest.mark.gpu
def test_compiled_heads_scorer_on_a_decode_batch():
    """64 decode tokens of 64 slots, 64 heads x 128 dims, bf16 keys, up to 65,536 visible entries
    through scattered pages: the heads path's scores (what `auto` runs for decode) match the
    float32 scorer and the tokens-as-rows kernel; the one-call top-512 nearly matches the float32
    scorer's (bf16 rounding may swap near-ties)."""
    from atom_jax.models import index_topk as it

    rng = np.random.default_rng()
    t, pages, epp, k = 64, 1024, 64, 512
    cap = pages * epp
    chunks = [(s, int(rng.integers(0, 4 * cap)), np.zeros(1, np.int32), True) for s in range(t)]
    b = {n: jnp.asarray(v) for n, v in pack_chunks(chunks, t, t).arrays().items()}
    page_table = jnp.asarray(np.stack([rng.permutation(2 * pages)[:pages] for _ in range(t)]), jnp.int32)
    pool = jnp.asarray(rng.standard_normal((2 * pages * epp, 128)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((t, 64, 128)), jnp.bfloat16).astype(jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, 64)) / 64, jnp.float32)
    n_vis = visible_counts(b, 4)
    live = np.arange(cap)[None, :] < np.asarray(n_vis)[:, None]
    kinds = {"heads": ("heads", "cols"), "heads-rows": ("heads", "rows"), "tiles": ("tiles", "cols")}
    got = {n: np.asarray(jax.jit(sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, epp, cap, t, path=p,
                                                       tiles=sparse_indexer.IndexerTiles(heads_as=a)))(0))
           for n, (p, a) in kinds.items()}
    ref = jax.jit(jnp_index_scorer(q, w, pool, page_table, b["slot"], epp, cap))(0)
    norm = np.linalg.norm(np.where(live, ref, 0))
    for n in kinds:
        assert np.linalg.norm(np.where(live, got[n] - np.asarray(ref), 0)) / norm < 1e-3, n
        assert np.linalg.norm(np.where(live, got[n] - got["tiles"], 0)) / norm < 1e-4, n
    plan = it.plan_topk(t, cap, k, "single")
    make = lambda width: sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, epp, width, t)  # noqa: E731
    (ki, kok), (ri, rok) = [jax.jit(lambda: it.index_topk(m, n_vis, k, plan))() for m in (
        make, lambda width: jnp_index_scorer(q, w, pool, page_table, b["slot"], epp, width))]
    for r in range(t):
        a, c = set(np.asarray(ki)[r][np.asarray(kok)[r]]), set(np.asarray(ri)[r][np.asarray(rok)[r]])
        assert len(a) == len(c) == min(k, int(n_vis[r])) and len(a & c) >= 0.98 * len(c)


def test_attend_takes_the_module_tiles_at_trace_time(monkeypatch):
    """Without tiles=, the kernel's grid follows sparse_attention.TILES as it is when traced (what
    `bench long-context --attention-tiles` sets): 2 and 4 heads per program."""
    rng = np.random.default_rng()
    b, q, kv, ring_kv, ring_pos, sinks, args = _attention_inputs(rng, "hca")
    t, heads = q.shape[:2]
    for bh in (2, 4):
        monkeypatch.setattr(sparse_attention, "TILES", sparse_attention.AttentionTiles(block_h=bh, block_k=16))
        jaxpr = jax.make_jaxpr(lambda q: sparse_attention.attend(q, kv, ring_kv, ring_pos, b, sinks, 0.1,
                                                                 interpret=True, **args))(q)
        grids = [e.params["grid_mapping"].grid for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
        assert [g[:2] for g in grids] == [(t, max(heads, sparse_attention.MIN_ROWS) // bh)]  # heads padded to 16
