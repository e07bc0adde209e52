"""Per-rank KV cache state for DeepSeek-V4 (docs/design.md, "The step").

Per layer:
- `ring_kv` [slots, W, hd] / `ring_pos` [slots, W]: the last W (sliding window) key/value rows of
  each sequence slot, with their positions (-1 = empty).
- compressed layers: `entries` [pages * entries_per_page, hd], a paged pool of compressed entries
  (entry w of a slot lives on page page_table[slot, w // entries_per_page]); `tail`
  [slots, R, columns]: the per-token compressor projections (kv [c*hd] then gate [c*hd]) of the
  last R positions (R = ratio for HCA; 2 * ratio for CSA, whose entries also read the previous
  window), so a window cut by a chunk boundary completes exactly in the next chunk.
- CSA layers: the indexer's pool `ientries`; its kv and gate projections [2*di] each follow
  the attention compressor's in the same `tail` rows (`compressor_columns`).

A page covers `page_tokens` positions of a sequence (a multiple of every compression ratio);
the host allocates pages (atom_jax.scheduler.pages) and passes each slot's page table in.

With `state_pages` > 0 (prefix caching), up to that many pages at once also keep what a
sequence continuing right after them needs beyond the compressed entries (the page's "window
state"), in a separate pool of `state_pages` entries; the host assigns entries to pages
(`scheduler.pages.StatePool`) and each token of a step carries its page's entry (-1: none,
nothing kept). The step writes, as tokens pass:
- every layer: `page_ring` [state_pages, min(W, page_tokens), hd], the KV rows of the page's
  last positions (the sliding window at the page's end; with pages shorter than W the window
  spans several pages, all of whose rows are kept);
- CSA layers: `page_tail` [state_pages, ratio, columns], the compressor and indexer
  projections (the `tail` columns) of the page's last `ratio` positions (their Ca half feeds
  the next page's first entry). HCA needs nothing: a page
  ends on a window boundary and no HCA window overlaps the previous one.
`atom_jax.cache.restore` copies them into a slot when a sequence starts on cached pages. The
window state is ~7x a page's compressed entries at V4-Flash dims, hence a pool smaller than
the pages (docs/design.md, "Prefix caching")."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from atom_jax.config import CSA, SLIDING, ModelConfig
from atom_jax.models.compressor import compressor_columns


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    num_slots: int  # sequences resident at once per rank
    num_pages: int  # pages per rank
    page_tokens: int  # sequence positions per page
    max_pages_per_seq: int  # page-table width: max context = page_tokens * max_pages_per_seq
    state_pages: int = 0  # entries of the pages' window-state pool (prefix caching; 0: none)

    @property
    def page_state(self) -> bool:
        return self.state_pages > 0

    @property
    def max_context(self) -> int:
        return self.page_tokens * self.max_pages_per_seq

    def check(self, cfg: ModelConfig):
        for r in (cfg.csa_ratio, cfg.hca_ratio):
            if self.page_tokens % r:
                raise ValueError(f"page_tokens {self.page_tokens} must be a multiple of compression ratio {r}")

    def entries_per_page(self, ratio: int) -> int:
        return self.page_tokens // ratio


def _ratio(cfg: ModelConfig, kind: str) -> int:
    return cfg.csa_ratio if kind == CSA else cfg.hca_ratio


def init_layer_cache(cfg: ModelConfig, layout: CacheLayout, kind: str, dtype) -> dict:
    s, w, d = layout.num_slots, cfg.sliding_window, cfg.head_dim
    layer = {"ring_kv": jnp.zeros((s, w, d), dtype), "ring_pos": jnp.full((s, w), -1, jnp.int32)}
    if layout.page_state:
        layer["page_ring"] = jnp.zeros((layout.state_pages, min(w, layout.page_tokens), d), dtype)
    if kind == SLIDING:
        return layer
    r = _ratio(cfg, kind)
    overlap = kind == CSA
    span, c = (2 * r, 2) if overlap else (r, 1)
    pool = layout.num_pages * layout.entries_per_page(r)
    width = sum(compressor_columns(cfg, kind))
    layer.update(entries=jnp.zeros((pool, d), dtype), tail=jnp.zeros((s, span, width), jnp.float32))
    if overlap:
        layer["ientries"] = jnp.zeros((pool, cfg.index_head_dim), dtype)
        if layout.page_state:
            layer["page_tail"] = jnp.zeros((layout.state_pages, r, width), jnp.float32)
    return layer


def init_cache(cfg: ModelConfig, layout: CacheLayout, dtype=jnp.float32) -> list[dict]:
    layout.check(cfg)
    return [init_layer_cache(cfg, layout, kind, dtype) for kind in cfg.attn_kinds]
