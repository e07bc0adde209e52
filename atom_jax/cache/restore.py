"""Rebuild a slot's per-sequence state at a page boundary from the state kept with the pages
(prefix caching; see layout.py): what a sequence starting on cached pages needs before its
first chunk runs.

For a sequence admitted at position P (a multiple of page_tokens) onto cached pages whose
window state is kept (the scheduler admits only there):
- the ring gets positions P-W .. P-1 (every one of its W rows is rewritten, rows before
  position 0 marked empty, so nothing of the slot's previous sequence stays visible);
- CSA compressor and indexer tails get the projections of positions P-ratio .. P-1 (the Ca
  half of the window before P, which the first entry after P mixes in).
HCA tails need nothing at a page boundary. The compressed entries stay where they are, in
the shared pages (no copy)."""

from __future__ import annotations

import jax.numpy as jnp


def restore_slots(cache: list[dict], slots, starts, entries, page_tokens: int) -> list[dict]:
    """cache: one rank's layers; slots / starts [K]: slot and start position of each restore
    (padding rows: slot >= num_slots, dropped); entries [K, window_pages]: the window-state
    entries of the pages just before each start, the oldest first (-1: before position 0)."""
    out = []
    for layer in cache:
        layer = dict(layer)
        if "page_ring" in layer:
            w = layer["ring_kv"].shape[1]
            q = starts[:, None] - w + jnp.arange(w)[None, :]  # [K, W]
            rows = _rows_at(layer["page_ring"], entries, starts, q, page_tokens)
            ok = q >= 0
            layer["ring_kv"] = _set(layer["ring_kv"], slots, q % w, jnp.where(ok[..., None], rows, 0))
            layer["ring_pos"] = _set(layer["ring_pos"], slots, q % w, jnp.where(ok, q, -1))
        if "page_tail" in layer:  # every compressor's projections (kv, gate; the indexer's)
            r = layer["page_tail"].shape[1]
            span = layer["tail"].shape[1]
            q = starts[:, None] - r + jnp.arange(r)[None, :]  # [K, ratio], >= 0: P >= page
            rows = _rows_at(layer["page_tail"], entries, starts, q, page_tokens)
            layer["tail"] = _set(layer["tail"], slots, q % span, rows)
        out.append(layer)
    return out


def _rows_at(store, entries, starts, q, page_tokens):
    """Rows of positions q [K, n] (before each start) from store [state_pages, m, ...]."""
    m = store.shape[1]
    back = starts[:, None] // page_tokens - q // page_tokens  # 1: the page just before the start
    col = jnp.clip(entries.shape[1] - back, 0, entries.shape[1] - 1)
    entry = jnp.take_along_axis(entries, col, axis=1)
    return store[jnp.maximum(entry, 0), jnp.maximum(q % page_tokens - (page_tokens - m), 0)]


def _set(buf, slots, idx, values):
    return buf.at[slots[:, None], idx].set(values.astype(buf.dtype), mode="drop")
