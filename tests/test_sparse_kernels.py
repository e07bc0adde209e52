"""The long-context kernels (Pallas, interpret mode on CPU) against the jnp reference path on
fresh random inputs: several chunks of different sequences in one packed buffer, ragged
lengths not multiples of the compression ratio, chunks starting inside compression windows,
page tables with holes (columns past a sequence's pages point at other sequences' pages) and
pages reused across slots' histories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.cache import pack_chunks
from atom_jax.kernels import sparse_attention, sparse_indexer
from atom_jax.models.cache_reads import NO_ENTRY, jnp_index_scorer, running_topk, visible_counts

RATIO = 4
EPP = 4  # entries per page: page_tokens 16


def _batch(rng, size=64):
    """A packed buffer of 3 prefill chunks (starts inside windows) and 2 decode tokens, with
    a page table per slot whose unused columns point at pages other slots own."""
    n_slots, max_pages = 6, 12
    starts = [int(rng.integers(0, 150)) for _ in range(5)]
    lens = [int(rng.integers(5, 17)), int(rng.integers(1, 12)), int(rng.integers(3, 9)), 1, 1]
    slots = rng.permutation(n_slots)[:5]
    chunks = [(int(s), st, np.zeros(n, np.int32), True) for s, st, n in zip(slots, starts, lens)]
    b = pack_chunks(chunks, size, n_slots)
    pages = rng.permutation(n_slots * max_pages).astype(np.int32)  # each page once: no two slots share
    page_table = pages.reshape(n_slots, max_pages)
    return {k: jnp.asarray(v) for k, v in b.arrays().items()}, jnp.asarray(page_table), n_slots


def _topk_oracle(scores, n_vis, k):
    """Sort by (score desc, entry index asc) in numpy: the documented tie rule."""
    out = []
    for s, n in zip(np.asarray(scores), np.asarray(n_vis)):
        order = sorted(range(n), key=lambda e: (-s[e], e))[:k]
        out.append(set(order))
    return out


def test_indexer_kernel_and_running_topk_match_reference():
    rng = np.random.default_rng()
    b, page_table, n_slots = _batch(rng)
    t, heads, dim = b["pos"].shape[0], 2, 16
    pool = jnp.asarray(rng.standard_normal((n_slots * 12 * EPP, dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((t, heads, dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, heads)), jnp.float32)
    n_vis = visible_counts(b, RATIO)
    cap = page_table.shape[1] * EPP
    tiles = sparse_indexer.IndexerTiles(block_t=16, block_e=16)
    ref = jnp_index_scorer(q, w, pool, page_table, b["slot"], EPP, 32)
    ker = sparse_indexer.scorer(q, w, pool, page_table, b, n_vis, EPP, 32, 6, tiles=tiles, interpret=True)
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


def _attention_inputs(rng, kind, dtype=jnp.float32):
    b, page_table, n_slots = _batch(rng)
    t, heads, d, win = b["pos"].shape[0], 4, 32, 8
    q = jnp.asarray(rng.standard_normal((t, heads, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((t, d)), dtype)
    ring_kv = jnp.asarray(rng.standard_normal((n_slots, win, d)), dtype)
    # each slot's ring holds the window before its chunk start (position -1 where empty)
    ring_pos = np.full((n_slots, win), -1, np.int32)
    for s, st in zip(np.asarray(b["slot"]), np.asarray(b["seg_start_pos"])):
        for p in range(max(0, st - win), st):
            ring_pos[s, p % win] = p
    pool = jnp.asarray(rng.standard_normal((n_slots * 12 * EPP, d)), dtype)
    n_vis = visible_counts(b, RATIO)
    sel = None
    if kind == "csa":
        k = 6
        sel = np.full((t, k), NO_ENTRY, np.int32)
        for r, n in enumerate(np.asarray(n_vis)):
            pick = rng.permutation(n)[:k]
            sel[r, : len(pick)] = pick
        sel = jnp.asarray(sel)
    sinks = jnp.asarray(rng.standard_normal(heads), jnp.float32)
    return b, page_table, q, kv, ring_kv, jnp.asarray(ring_pos), pool, n_vis, sel, sinks


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_attention_kernel_matches_reference(kind):
    from atom_jax.models.cached_attention import reference_attend

    rng = np.random.default_rng()
    b, pt, q, kv, ring_kv, ring_pos, pool, n_vis, sel, sinks = _attention_inputs(rng, kind)
    args = dict(pool=None if kind == "sliding" else pool, page_table=pt, epp=EPP,
                n_visible=None if kind == "sliding" else n_vis, selected=sel)
    scale = q.shape[-1] ** -0.5
    tiles = sparse_attention.AttentionTiles(block_h=4, block_k=16)
    out = sparse_attention.attend(q, kv, ring_kv, ring_pos, b, sinks, scale, tiles=tiles, interpret=True, **args)
    ref = reference_attend(q, kv, ring_kv, ring_pos, b, sinks, scale, **args)
    valid = np.asarray(b["valid"])
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=2e-5, atol=2e-5)


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

    def attn(sel):
        def fn(q, kv, ring, rpos, bb, sinks, pool, pt, nv, *s):
            return sparse_attention.attend(q, kv, ring, rpos, bb, sinks, 0.04, pool=pool, page_table=pt, epp=epp,
                                           n_visible=nv, selected=s[0] if s else None)
        args = [bf(t, 64, 512), bf(t, 512), bf(slots, 128, 512), i32(slots, 128), b,
                jax.ShapeDtypeStruct((64,), jnp.float32), bf(slots * pages * epp, 512), i32(slots, pages), i32(t)]
        export(fn, *args, *([i32(t, 512)] if sel else []))

    attn(sel=True)
    attn(sel=False)
    export(lambda q, kv, ring, rpos, bb, sinks: sparse_attention.attend(q, kv, ring, rpos, bb, sinks, 0.04),
           bf(t, 64, 512), bf(t, 512), bf(slots, 128, 512), i32(slots, 128), b, jax.ShapeDtypeStruct((64,), jnp.float32))
    export(lambda q, w, pool, pt, bb, nv: sparse_indexer.block_scores(q, w, pool, pt, bb, nv, 0, epp, 4096, slots),
           jax.ShapeDtypeStruct((t, 64, 128), jnp.float32), jax.ShapeDtypeStruct((t, 64), jnp.float32),
           bf(slots * pages * epp, 128), i32(slots, pages), b, i32(t))
