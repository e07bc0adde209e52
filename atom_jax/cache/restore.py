"""Rebuild a slot's per-sequence state at a page boundary from the state kept with the pages
(prefix caching; see layout.py): what a sequence starting on cached pages needs before its
first chunk runs.

For a sequence admitted at position P (a multiple of page_tokens) onto cached pages:
- the ring gets positions P-W .. P-1 (every one of its W rows is rewritten, rows before
  position 0 marked empty, so nothing of the slot's previous sequence stays visible);
- CSA compressor and indexer tails get the projections of positions P-ratio .. P-1 (the Ca
  half of the window before P, which the first entry after P mixes in).
HCA tails need nothing at a page boundary. The compressed entries stay where they are, in
the shared pages (no copy)."""

from __future__ import annotations

import jax.numpy as jnp


def restore_slots(cache: list[dict], slots, starts, page_table, page_tokens: int) -> list[dict]:
    """cache: one rank's layers; slots / starts [K]: slot and start position of each restore
    (padding rows: slot >= num_slots, dropped); page_table [slots, max_pages]."""
    out = []
    for layer in cache:
        layer = dict(layer)
        if "page_ring" in layer:
            w = layer["ring_kv"].shape[1]
            q = starts[:, None] - w + jnp.arange(w)[None, :]  # [K, W]
            rows = _page_rows_at(layer["page_ring"], page_table, slots, jnp.maximum(q, 0), page_tokens)
            ok = q >= 0
            layer["ring_kv"] = _set(layer["ring_kv"], slots, q % w, jnp.where(ok[..., None], rows, 0))
            layer["ring_pos"] = _set(layer["ring_pos"], slots, q % w, jnp.where(ok, q, -1))
        for pre in ("", "i"):
            if f"page_{pre}tail_kv" in layer:
                r = layer[f"page_{pre}tail_kv"].shape[1]
                span = layer[f"{pre}tail_kv"].shape[1]
                q = starts[:, None] - r + jnp.arange(r)[None, :]  # [K, ratio], >= 0: P >= page
                for part in ("kv", "gate"):
                    rows = _page_rows_at(layer[f"page_{pre}tail_{part}"], page_table, slots, q, page_tokens)
                    layer[f"{pre}tail_{part}"] = _set(layer[f"{pre}tail_{part}"], slots, q % span, rows)
        out.append(layer)
    return out


def _page_rows_at(store, page_table, slots, q, page_tokens):
    """Rows of positions q [K, n] of each restore's sequence from store [pages, m, ...]."""
    m = store.shape[1]
    page = page_table[jnp.minimum(slots, page_table.shape[0] - 1)[:, None], q // page_tokens]
    return store[page, jnp.maximum(q % page_tokens - (page_tokens - m), 0)]


def _set(buf, slots, idx, values):
    return buf.at[slots[:, None], idx].set(values.astype(buf.dtype), mode="drop")
