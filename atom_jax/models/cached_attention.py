"""Attention over a packed token buffer with the per-rank cache (prefill chunks and decode).

For token t (slot s, position p) the visible keys are: the slot's ring rows from before this
chunk (position in (p - W, p]), rows of the same chunk in the buffer (same window rule), and
compressed entries w < (p + 1) // ratio (HCA: all of them; CSA: the indexer's top-k). Entries
completed inside this step are written to the paged pool first, so later tokens see them.
The math is the full-sequence path's (attention.py); only where keys come from differs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from atom_jax.config import CSA, SLIDING
from atom_jax.kernels.names import ATTN_BACKENDS
from atom_jax.kernels.norm_rope import rope_queries, unrope_output
from atom_jax.kernels.platform import is_cpu, target_platform
from atom_jax.models.attention import Attention
from atom_jax.models.cache_reads import entry_addresses, jnp_index_scorer, max_windows, visible_counts
from atom_jax.models.index_topk import TopkPlan, index_topk, plan_topk
from atom_jax.models.layers import rope_cos_sin
from atom_jax.models.trace_once import traced_once


def _write_last(buf, slot, idx, values, keep):
    """buf[slot, idx] = values where keep (others dropped: their slot index goes out of range)."""
    slot = jnp.where(keep, slot, buf.shape[0])
    return buf.at[slot, idx].set(values.astype(buf.dtype), mode="drop")


def _window_index(b, positions, n_rows: int, span: int):
    """Where the rows of `positions` [W, n] of each window's slot come from: this chunk's rows
    (index into the step's [T] rows) where the position is at or after the chunk start, else the
    slot's tail (indexed by position mod span). -> (in_chunk [W, n], chunk_idx, slot, tail_idx)."""
    in_chunk = positions >= b["seg_start_pos"][:, None]
    idx = jnp.clip(b["seg_start_idx"][:, None] + positions - b["seg_start_pos"][:, None], 0, n_rows - 1)
    return in_chunk, idx, b["slot"][:, None], jnp.mod(positions, span)


def _window_rows(proj, tail, index):
    """Rows [W, n, c] of `_window_index`'s positions: from proj [T, c] or from tail [slots, span, c]."""
    in_chunk, idx, slot, tail_idx = index
    return jnp.where(in_chunk[..., None], proj[idx], tail[slot, tail_idx])


def _page_rows(store, b, values, page_tokens):
    """Keep the rows of each page's last positions with the page's window-state entry (prefix
    caching; b["state"], -1: none): row i of an entry in store [state_pages, n, ...] holds its
    page's position page_tokens - n + i."""
    n = store.shape[1]
    pos = b["pos"]
    off = jnp.mod(pos, page_tokens) - (page_tokens - n)
    keep = b["valid"] & (off >= 0) & (b["state"] >= 0)
    addr = jnp.where(keep, b["state"], store.shape[0])
    return store.at[addr, jnp.maximum(off, 0)].set(values.astype(store.dtype), mode="drop")


PLANS = "plans"  # a chain's batch dict may hold a memo under this key: per-step plans every layer shares


def _window_plan(b, r: int, overlap: bool, span: int, page_table, epp: int, pool_rows: int, max_segments: int):
    """What the compressors of every layer of ratio `r` need that depends on the batch (and the
    page table) only, worked out once per step when b holds a PLANS memo (the cached step puts
    one in each chain's batch): the tokens that close a window (`jnp.nonzero`), their windows'
    entry index w, positions `win` and where their rows come from, the pool address of each new
    entry (out of range: none), and which tokens' rows the tail keeps."""
    memo = b.get(PLANS)
    # the entry holds the page table it was made from: a hit must be that very object (an id
    # alone could be reused by another array once the first is freed)
    key = ("windows", r, overlap, span, epp, pool_rows, max_segments, id(page_table))
    if memo is not None and key in memo and memo[key][0] is page_table:
        return memo[key][1]
    pos = b["pos"]
    n = pos.shape[0]
    (src,) = jnp.nonzero(b["valid"] & (jnp.mod(pos + 1, r) == 0), size=max_windows(n, r, max_segments),
                         fill_value=n)
    done = src < n
    wb = {k: b[k][jnp.minimum(src, n - 1)] for k in ("pos", "slot", "seg_start_idx", "seg_start_pos")}
    w = (wb["pos"] + 1) // r - 1
    if overlap:  # Ca of window w-1 (first r slots) then Cb of window w
        win = (w[:, None] - 1) * r + jnp.arange(2 * r)[None, :]
    else:
        win = w[:, None] * r + jnp.arange(r)[None, :]
    plan = {"w": w, "win": win, "index": _window_index(wb, win, n, span),
            "addr": jnp.where(done, entry_addresses(page_table, wb["slot"], jnp.maximum(w, 0), epp), pool_rows),
            "keep": b["valid"] & (pos >= b["seg_end_pos"] - span)}  # only the chunk's last `span` survive
    if memo is not None:
        memo[key] = (page_table, plan)
    return plan


def _compress_step(comps, proj, b, tail, pools, plan, inv_freq, page_tail=None, page_tokens=0):
    """Emit the entries of every compressor in `comps` (one layer's, all of one ratio: the
    attention's, and on CSA layers the indexer's) completed in this step, write them and the
    new tails (and, given the layout's page state `page_tail`, each page's last tail rows).
    proj [T, >= tail columns]: this step's tokens' compressor projections (the attention's
    `compressor_projections`; extra columns after the tail's are ignored); `plan`: the step's
    `_window_plan` for their ratio. -> (pools, tail, page_tail).

    The compressors share the tail array (`compressor.compressor_columns`: each one's kv then
    gate projections, side by side), so the rows of a window come from one gather of this
    step's rows and one of the tail, and the tail and the page tail take one scatter each;
    the window plan (which tokens close a window, their window's rows) is worked out once.

    Works per completed window (at most T // ratio + chunks of them, `max_windows`), not per
    token: only the tokens that close a window gather their window's rows."""
    r, overlap = comps[0].ratio, comps[0].overlap
    pos = b["pos"]
    width = tail.shape[-1]
    # each compressor's gate columns get its position bias; its kv columns nothing
    bias = jnp.concatenate([part for comp in comps for part in
                            (jnp.zeros_like(comp.ape[...]), comp.ape[...])], axis=-1)
    if bias.shape[-1] != width or proj.shape[-1] < width:
        raise ValueError(f"the compressors' projections are {bias.shape[-1]} wide, the cache tail {width}")
    rows = proj[:, :width].astype(jnp.float32) + bias[jnp.mod(pos, r)]
    w, win = plan["w"], plan["win"]
    window = _window_rows(rows, tail, plan["index"])  # [windows, r or 2r, every compressor's columns]
    first = jnp.arange(2 * r)[None, :] < r
    addr = plan["addr"]
    out, off = [], 0
    for comp, pool in zip(comps, pools):
        cd = (2 if overlap else 1) * comp.head_dim
        wkv, wg = window[..., off: off + cd], window[..., off + cd: off + 2 * cd]
        off += 2 * cd
        if overlap:
            d = comp.head_dim
            wkv = jnp.where(first[..., None], wkv[..., :d], wkv[..., d:])
            wg = jnp.where(first[..., None], wg[..., :d], wg[..., d:])
            wg = jnp.where((win < 0)[..., None], -jnp.inf, wg)
        pooled = jnp.sum(wkv * jax.nn.softmax(wg, axis=1), axis=1)
        entries = comp.finish(pooled, w * r, inv_freq)
        out.append(pool.at[addr].set(entries.astype(pool.dtype), mode="drop"))
    span = tail.shape[1]
    tail = _write_last(tail, b["slot"], jnp.mod(pos, span), rows, plan["keep"])
    if page_tail is not None:
        page_tail = _page_rows(page_tail, b, rows, page_tokens)
    return out, tail, page_tail


def cached_attention(attn: Attention, x, b, cache: dict, page_table, layout, backend: str = "jnp"):
    """x [T, D] normed attention input; b: the PackedBatch arrays (jnp); cache: this layer's.
    backend: "jnp" (reference, CPU path) or "pallas" (kernels/sparse_*.py; interpreted on CPU).

    -> (out [T, D], new layer cache).

    The compressors' window plan is worked out here, once per step when b holds a PLANS memo;
    the rest is one function of the layer traced once per layer kind (models/trace_once.py)."""
    windows = None
    if attn.kind != SLIDING:
        r = attn.ratio
        windows = _window_plan(b, r, attn.compressor.overlap, cache["tail"].shape[1], page_table,
                            layout.entries_per_page(r), cache["entries"].shape[0], layout.num_slots)
    arrays = {k: v for k, v in b.items() if k != PLANS}
    return _cached_attention(attn, x, arrays, cache, page_table, windows, layout, backend)


@traced_once
def _cached_attention(attn: Attention, x, b, cache: dict, page_table, windows, layout, backend: str):
    cfg = attn.cfg
    inv = attn.inv_freq
    pos, slot, valid = b["pos"], b["slot"], b["valid"]
    win = cfg.sliding_window
    kernels = _kernels(backend)
    q_a, kv_a = attn.project_in(x)
    # the kernels take q as projected and give the output back de-rotated (their norm and RoPE, in the
    # kernel where its tiles fuse them); the jnp path, q normed and roped and its output to de-rotate
    q, q_lora = attn.query_heads(q_a[None]) if kernels is not None else attn.queries(q_a[None], pos[None])
    q, q_lora = q[0], q_lora[0]  # [T, H, hd], [T, R]
    kv = attn.keys(kv_a[None], pos[None])[0]  # [T, hd]
    cache = dict(cache)
    segs = layout.num_slots  # a buffer (or each TBO half) holds at most one chunk per slot

    pool, top, n_vis = None, None, None
    if attn.kind != SLIDING:
        r = attn.ratio
        epp = layout.entries_per_page(r)
        comps, pools = [attn.compressor], ["entries"]
        if attn.kind == CSA:
            comps, pools = comps + [attn.indexer.compressor], pools + ["ientries"]
        proj = attn.compressor_projections(x)
        out, tail, page_tail = _compress_step(comps, proj, b, cache["tail"], [cache[k] for k in pools], windows, inv,
                                              cache.get("page_tail"), layout.page_tokens)
        cache.update(zip(pools, out), tail=tail)
        if page_tail is not None:
            cache["page_tail"] = page_tail
        pool = cache["entries"]
        n_vis = visible_counts(b, r)
        if attn.kind == CSA:
            ipool = cache["ientries"]
            qi, wi = attn.indexer.query(proj[:, cache["tail"].shape[-1]:], q_lora, pos, inv)
            capacity = page_table.shape[1] * epp
            k = min(cfg.index_topk, capacity)
            if kernels is None:
                plan = TopkPlan("loop", loop_block=min(INDEX_BLOCK_JNP, capacity))
                make = lambda width: jnp_index_scorer(qi, wi, ipool, page_table, slot, epp, width)  # noqa: E731
            else:
                ind = kernels.sparse_indexer
                tiles = ind.tiles_for_step(pos.shape[0])
                plan = plan_topk(pos.shape[0], capacity, k, align=tiles.block_e)
                make = lambda width, rows=None: ind.scorer(qi, wi, ipool, page_table, b, n_vis, epp,  # noqa: E731
                                                           width, segs, tiles, kernels.interpret, rows=rows)
            top, _ = index_topk(make, n_vis, k, plan, select=None if kernels is None else kernels.select)

    keys = dict(pool=pool, page_table=page_table, epp=layout.entries_per_page(attn.ratio) if pool is not None else 1,
                n_visible=n_vis, selected=top)
    if kernels is not None:
        out = kernels.sparse_attention.attend(q, kv, cache["ring_kv"], cache["ring_pos"], b, attn.sinks[...],
                                              cfg.head_dim ** -0.5, interpret=kernels.interpret,
                                              rope=rope_cos_sin(pos, inv), norm_eps=cfg.rms_norm_eps, **keys)
        out = attn.project_out(out[None])[0]
    else:
        out = reference_attend(q, kv, cache["ring_kv"], cache["ring_pos"], b, attn.sinks[...], cfg.head_dim ** -0.5,
                               **keys)
        out = attn.output(out[None], pos[None])[0]

    # ring update after reading: each chunk's last W rows replace the slot's oldest
    keep = valid & (pos >= b["seg_end_pos"] - win)
    cache["ring_kv"] = _write_last(cache["ring_kv"], slot, jnp.mod(pos, win), kv, keep)
    cache["ring_pos"] = _write_last(cache["ring_pos"], slot, jnp.mod(pos, win), pos, keep)
    if "page_ring" in cache:  # prefix caching: the window rows at each page's end
        cache["page_ring"] = _page_rows(cache["page_ring"], b, kv, layout.page_tokens)
    return out, cache


INDEX_BLOCK_JNP = 512  # entries scored per running-top-k step on the jnp path ([T, heads, block])


class _Kernels:
    def __init__(self, interpret: bool):
        from atom_jax.kernels import sparse_attention, sparse_indexer, topk_select
        self.sparse_attention, self.sparse_indexer, self.interpret = sparse_attention, sparse_indexer, interpret
        self.select = functools.partial(topk_select.radix_select, interpret=interpret)  # "rowselect"'s selection


def _kernels(backend: str):
    """None for the jnp path, else the Pallas kernel modules (interpreted on CPU)."""
    name = resolve_attn_backend(backend)
    if name == "jnp":
        return None
    return _Kernels(interpret=is_cpu())


def resolve_attn_backend(backend: str, platform: str | None = None) -> str:
    """`auto`: the jnp path on CPU, the Pallas (Triton) kernels on GPUs (NVIDIA and ROCm)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {list(ATTN_BACKENDS)}")
    if backend != "auto":
        return backend
    return "jnp" if (platform or target_platform()) == "cpu" else "pallas"


def reference_attend(q, kv, ring_kv, ring_pos, b, sinks, scale, pool=None, page_table=None, epp=1,
                     n_visible=None, selected=None, rope=None, norm_eps=None):
    """The jnp path and oracle (same contract as kernels.sparse_attention.attend): softmax with
    the per-head sink over each token's window rows, its selected CSA entries or its visible HCA
    entries (models/attention.py's math), as an online softmax over those key sets, so every
    tensor is [T, W], [T, k] or [T, HCA_BLOCK_JNP] keys: the HCA entries are read block by block
    up to the step's longest visible prefix, never the cache's capacity.

    q [T,H,hd]; kv [T,hd] this step's rows; ring_kv [slots,W,hd] / ring_pos [slots,W] as before
    this step; pool [N,hd] compressed entries (None: sliding only); n_visible [T]; selected
    [T,k] entry indices (CSA; None: all visible entries, HCA). rope / norm_eps: as the kernel's
    (q as projected, normed and roped here, the output de-rotated; None: q as given)."""
    if rope is not None:
        return unrope_output(reference_attend(rope_queries(q, rope, norm_eps), kv, ring_kv, ring_pos, b, sinks, scale,
                                              pool, page_table, epp, n_visible, selected), rope)
    t, h, d = q.shape
    state = (jnp.full((t, h), _NEG, jnp.float32), jnp.zeros((t, h), jnp.float32), jnp.zeros((t, h, d), jnp.float32))
    state = _online(q, state, *window_keys(kv, ring_kv, ring_pos, b), scale)
    slot = b["slot"][:, None]
    if pool is not None and selected is not None:
        ok = selected < n_visible[:, None]
        keys = pool[entry_addresses(page_table, slot, jnp.where(ok, selected, 0), epp)]
        state = _online(q, state, keys, ok, scale)
    elif pool is not None:
        blk = min(HCA_BLOCK_JNP, page_table.shape[1] * epp)
        cols = jnp.arange(blk, dtype=jnp.int32)

        def block(i, st):
            e = i * blk + cols
            ok = e[None, :] < n_visible[:, None]
            keys = pool[entry_addresses(page_table, slot, jnp.where(ok, e[None, :], 0), epp)]
            return _online(q, st, keys, ok, scale)

        state = jax.lax.fori_loop(0, (jnp.max(n_visible, initial=0) + blk - 1) // blk, block, state)
    m, l, acc = state
    sink = sinks.astype(jnp.float32)[None, :]
    m_new = jnp.maximum(m, sink)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.exp(sink - m_new)
    return (acc * (alpha / l)[..., None]).astype(q.dtype)


HCA_BLOCK_JNP = 256  # HCA entries per online-softmax step on the jnp path
_NEG = -1e30  # running max start: finite, so a fully masked set adds exp(-inf) = 0, never NaN


def window_keys(kv, ring_kv, ring_pos, b):
    """Each token's sliding-window rows, positions p - W + 1 .. p: rows of its own chunk from this
    step's keys (causal, never another chunk's), earlier ones from its slot's ring where the ring
    still holds that position. -> (keys [T, W, hd], ok [T, W])."""
    win = ring_kv.shape[1]
    j = b["pos"][:, None] - win + 1 + jnp.arange(win, dtype=jnp.int32)[None, :]
    start_pos = b["seg_start_pos"][:, None]
    in_chunk = j >= start_pos
    row = jnp.clip(b["seg_start_idx"][:, None] + j - start_pos, 0, kv.shape[0] - 1)
    slot, ring_idx = b["slot"][:, None], jnp.mod(j, win)
    ok = in_chunk | ((j >= 0) & (ring_pos[slot, ring_idx] == j))
    keys = jnp.where(in_chunk[..., None], kv[row], ring_kv[slot, ring_idx].astype(kv.dtype))
    return keys, ok


def _online(q, state, keys, ok, scale):
    """One online-softmax step over per-token keys [T,K,hd] (visible where ok [T,K]); keys double
    as values. Products in q's dtype, float32 accumulation."""
    m, l, acc = state
    s = jnp.einsum("thd,tkd->thk", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok[:, None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    pv = jnp.einsum("thk,tkd->thd", p.astype(q.dtype), keys.astype(q.dtype), preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv
