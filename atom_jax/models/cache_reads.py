"""Reading a rank's paged cache for the tokens of a packed buffer, at the cost of the context
each token really has rather than the cache's capacity (both attention backends use these).

- `entry_addresses`: pool address of entry w of a slot, through its page table.
- `running_topk`: the lightning indexer's top-k, scored block by block of entries up to the
  longest visible prefix of the step (a while loop whose trip count follows the real context),
  merging each block into a running top-k: no [T, heads, entries] or [T, capacity] tensor.
- `max_windows`: how many compression windows one step can complete (the compressor works on
  those windows only, never one window per token).

Tie rule of the indexer (both backends, and the full-sequence path): among equal scores the
LOWER entry index wins. `jax.lax.top_k` documents that rule for one call ("if two elements are
equal, the lower-index element appears first"); the merge keeps it because the running top-k
always comes first in the concatenation, holds only lower entry indices than the new block, and
is itself ordered lowest index first among equal scores. With few indexer heads relu makes exact
zero scores common, so the rule decides real selections (docs/design.md, "Kernels and weights")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NO_ENTRY = jnp.iinfo(jnp.int32).max  # index of an unfilled top-k place (never visible)


def entry_addresses(page_table, slot, w, epp: int):
    """Pool address of entry index `w` of `slot` (broadcasting). Indices past the page table
    are clamped to its last column: callers mask entries at or past the visible count."""
    col = jnp.minimum(w // epp, page_table.shape[1] - 1)
    return page_table[slot, col] * epp + jnp.mod(w, epp)


def visible_counts(b, ratio: int):
    """Compressed entries token t may use: w < (pos + 1) // ratio; 0 for padding tokens."""
    return jnp.where(b["valid"], (b["pos"] + 1) // ratio, 0).astype(jnp.int32)


def running_topk(block_scores, n_visible, k: int, block: int, trips: int = 0):
    """Top-k entry indices per token, scanning entry blocks [e0, e0 + block) for e0 < max(n_visible).
    `trips` > 0: scan exactly that many blocks instead (blocks past every visible prefix only
    merge -inf scores, so the result is the same): a loop whose trip count XLA knows, which on
    a GPU runs without copying its predicate to the host and blocking the launch every iteration.

    block_scores(e0) -> [T, block] float32 scores of entries e0.. of each token's slot (values at
    or past a token's visible count are ignored). -> (idx [T, k] int32, ok [T, k] bool): ok marks
    real visible entries; other places hold NO_ENTRY. Ties: lowest entry index first."""
    t = n_visible.shape[0]
    n_blocks = trips if trips else (jnp.max(n_visible, initial=0) + block - 1) // block
    cols = jnp.arange(block, dtype=jnp.int32)

    def merge(i, carry):
        vals, idx = carry
        e0 = i * block
        s = jnp.where((e0 + cols)[None, :] < n_visible[:, None], block_scores(e0), -jnp.inf)
        v, j = jax.lax.top_k(jnp.concatenate([vals, s], axis=1), k)
        # place j < k: the running top-k's entry idx[j]; else entry e0 + j - k of this block.
        # No [T, k + block] index array: with a static trip count of 1 XLA unrolls the loop,
        # and the concatenation of the initial NO_ENTRY places with the block's iota is then
        # all constant: folded into a [T, k + block] literal (88 MB at 8192 tokens) per layer.
        idx = jnp.where(j < k, jnp.take_along_axis(idx, jnp.minimum(j, k - 1), axis=1), e0 + j - k)
        return v, jnp.where(v > -jnp.inf, idx, NO_ENTRY)

    init = (jnp.full((t, k), -jnp.inf, jnp.float32), jnp.full((t, k), NO_ENTRY, jnp.int32))
    _, idx = jax.lax.fori_loop(0, n_blocks, merge, init)
    return idx, idx < n_visible[:, None]


def jnp_index_scorer(q, w, ipool, page_table, slot, epp: int, block: int, rows: int | None = None):
    """The jnp block scorer (CPU path and oracle): q [T, H, di] float32 (roped), w [T, H] float32
    (scales folded in) -> e0 -> [T, block] sum_h w[t,h] * relu(q[t,h] . key[e]). Gathers one
    block of keys per token ([T, block, di]), never the slot's whole capacity. rows: score
    `rows` tokens per call instead, (e0, r0) -> [rows, block] for tokens r0 .. r0 + rows - 1
    (rows past T score as token 0's slot and are the caller's to ignore)."""
    def scores(e0, q=q, w=w, slot=slot):
        e = e0 + jnp.arange(block, dtype=jnp.int32)
        keys = ipool[entry_addresses(page_table, slot[:, None], e[None, :], epp)].astype(jnp.float32)
        dots = jnp.einsum("thd,tbd->thb", q, keys)
        return jnp.einsum("thb,th->tb", jax.nn.relu(dots), w)

    if rows is None:
        return scores
    pad = -(-q.shape[0] // rows) * rows - q.shape[0]
    q, w, slot = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (q, w, slot))
    return lambda e0, r0: scores(e0, *(jax.lax.dynamic_slice_in_dim(x, r0, rows) for x in (q, w, slot)))


def max_windows(tokens: int, ratio: int, max_segments: int) -> int:
    """Windows a step of `tokens` tokens in at most `max_segments` chunks can complete: a chunk
    of n tokens completes at most n // ratio + 1."""
    return max(1, min(tokens, tokens // ratio + max_segments))
