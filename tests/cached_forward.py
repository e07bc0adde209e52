"""The model over a packed token buffer with the per-rank cache (single rank, no collectives):
the reference the sharded step and the engine are tested against."""

from __future__ import annotations

import jax.numpy as jnp

from atom_jax.models.cached_attention import cached_attention
from atom_jax.models.deepseek_v4 import DeepseekV4
from atom_jax.models.hyper import hc_merge


def cached_forward(model: DeepseekV4, cache: list[dict], b: dict, page_table, layout, moe_backend="ragged_dot",
                   attn_backend="jnp"):
    """-> (logits [S, vocab] at b["sample_idx"], new cache)."""
    ids = b["ids"]
    streams = model.embed_streams(ids)  # [T, N, D]
    new_cache = []
    for block, layer_cache in zip(model.layers, cache):
        post, comb, x = block.attn_in(streams)
        a, layer_cache = cached_attention(block.attn, x, b, layer_cache, page_table, layout, attn_backend)
        streams = hc_merge(streams, a, post, comb)
        post, comb, x = block.ffn_in(streams)
        streams = hc_merge(streams, block.ffn(x, ids, moe_backend), post, comb)
        new_cache.append(layer_cache)
    return model.logits(streams[b["sample_idx"]]), new_cache


def as_jnp(batch) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.arrays().items()}
