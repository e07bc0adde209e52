"""KV compressors (CSA with overlapping windows, HCA without) and CSA's lightning indexer.

A compressor turns every `ratio` source tokens into one entry: a per-channel softmax over the
window of (gate + learned position bias) weights the projected KV, then RMSNorm and RoPE at the
window's first position. CSA projects two series per token (Ca | Cb): entry w mixes window w-1's
Ca with window w's Cb, so its effective window is 2 * ratio with stride ratio.

The projections of the attention input that a compressed layer's compressors (and, on CSA
layers, the indexer's head weights) take are ONE weight matrix, the attention's `wcomp`
[hidden, sum(projection_columns)], filled at load time from the checkpoint's separate matrices
(models/param_map.py): one matmul per layer instead of two to five.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atom_jax.config import CSA, SLIDING, ModelConfig
from atom_jax.models.layers import apply_rope, const_param, normal_param, rms_norm, rope_cos_sin


def pool_windows(kv, gate, overlap: bool, prev_ca_kv=None, prev_ca_gate=None):
    """kv/gate [B, W, ratio, c*d] (gate already has the position bias) -> pooled [B, W, d] float32.

    overlap: c == 2; window w's pool covers Ca of window w-1 then Cb of window w. For w == 0 the
    Ca half comes from `prev_ca_*` ([B, ratio, d]) when given, else has zero weight."""
    kv = kv.astype(jnp.float32)
    gate = gate.astype(jnp.float32)
    if overlap:
        d = kv.shape[-1] // 2
        b, w, r, _ = kv.shape
        ca_kv, cb_kv = kv[..., :d], kv[..., d:]
        ca_g, cb_g = gate[..., :d], gate[..., d:]
        if prev_ca_kv is None:
            first_kv = jnp.zeros((b, 1, r, d), jnp.float32)
            first_g = jnp.full((b, 1, r, d), -jnp.inf, jnp.float32)
        else:
            first_kv = prev_ca_kv.astype(jnp.float32)[:, None]
            first_g = prev_ca_gate.astype(jnp.float32)[:, None]
        shifted_kv = jnp.concatenate([first_kv, ca_kv[:, :-1]], axis=1)
        shifted_g = jnp.concatenate([first_g, ca_g[:, :-1]], axis=1)
        kv = jnp.concatenate([shifted_kv, cb_kv], axis=2)
        gate = jnp.concatenate([shifted_g, cb_g], axis=2)
    weights = jax.nn.softmax(gate, axis=2)
    return jnp.sum(kv * weights, axis=2)


def compressor_columns(cfg: ModelConfig, kind: str) -> tuple[int, ...]:
    """Column widths of the compressors' projections of a compressed layer, in order: the
    attention compressor's kv and gate, then (CSA) the indexer compressor's kv and gate. Also
    the layout of the cache's `tail` rows (cache/layout.py): a step writes them as projected."""
    if kind == SLIDING:
        return ()
    c = 2 if kind == CSA else 1
    cols = (c * cfg.head_dim,) * 2
    return cols + ((2 * cfg.index_head_dim,) * 2 if kind == CSA else ())


def projection_columns(cfg: ModelConfig, kind: str) -> tuple[int, ...]:
    """Column widths of the attention's fused `wcomp`: `compressor_columns`, then (CSA) the
    indexer's head weights (its `weights_proj`, [index_n_heads])."""
    return compressor_columns(cfg, kind) + ((cfg.index_n_heads,) if kind == CSA else ())


class Compressor(nnx.Module):
    """A compressor's own parameters (position bias, norm); its kv and gate projections are
    columns of the attention's fused `wcomp` (module docstring)."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, overlap: bool):
        self.cfg = cfg
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = overlap
        c = 2 if overlap else 1
        self.ape = const_param((ratio, c * head_dim), 0.0)
        self.norm = const_param((head_dim,), 1.0)

    def finish(self, pooled, first_positions, inv_freq):
        """RMSNorm then RoPE at each window's first position."""
        out = rms_norm(pooled, self.norm[...], self.cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(first_positions, inv_freq)
        return apply_rope(out, cos, sin)

    def full_sequence(self, kv, gate, inv_freq):
        """kv / gate [B, S, c*d]: this compressor's projections of positions 0 .. S-1 -> entries
        [B, S // ratio, d] (float32)."""
        b, s, _ = kv.shape
        nw = s // self.ratio
        if nw == 0:  # shorter than one window: no entries yet
            return jnp.zeros((b, 0, self.head_dim), jnp.float32)
        kv = kv[:, : nw * self.ratio].reshape(b, nw, self.ratio, -1)
        gate = gate[:, : nw * self.ratio].reshape(b, nw, self.ratio, -1) + self.ape[...]
        pooled = pool_windows(kv, gate, self.overlap)
        first = jnp.broadcast_to(jnp.arange(nw) * self.ratio, (b, nw))
        return self.finish(pooled, first, inv_freq)


def visible_entries(positions, n_entries, ratio):
    """Query at position t sees compressed entry w iff w < (t + 1) // ratio. -> bool [B, S, T]."""
    limit = (positions + 1) // ratio
    return jnp.arange(n_entries)[None, None, :] < limit[..., None]


class Indexer(nnx.Module):
    """Lightning indexer: score_t(w) = sum_h weight_{t,h} * relu(q_{t,h} . k_w), keep the top-k
    causally visible entries per query. Its head weights `weights_proj` (x -> [H]) are the last
    columns of the attention's fused `wcomp` (module docstring)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.compressor = Compressor(cfg, cfg.csa_ratio, cfg.index_head_dim, True)
        self.wq_b = normal_param(rngs, (cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim), dtype)

    def query(self, head_proj, q_lora, positions, inv_freq):
        """head_proj [..,S,H] (x @ weights_proj), q_lora [..,S,R] -> (q [..,S,H,di] float32 roped,
        w [..,S,H] float32 with the 1/sqrt(di) and 1/sqrt(H) scales folded in):
        score(w) = sum_h w_h * relu(q_h . k_w)."""
        cfg = self.cfg
        q = (q_lora @ self.wq_b[...]).reshape(*q_lora.shape[:-1], cfg.index_n_heads, cfg.index_head_dim)
        cos, sin = rope_cos_sin(positions, inv_freq)
        q = apply_rope(q, cos[..., None, :], sin[..., None, :]).astype(jnp.float32)
        w = head_proj.astype(jnp.float32)
        return q, w * (cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5)

    def scores(self, head_proj, q_lora, positions, keys, inv_freq):
        """head_proj [B,S,H], q_lora [B,S,R], keys [B,T,di] -> index scores [B,S,T] float32 (no mask)."""
        q, w = self.query(head_proj, q_lora, positions, inv_freq)
        dots = jnp.einsum("bshd,btd->bsht", q, keys.astype(jnp.float32))
        return jnp.einsum("bsht,bsh->bst", jax.nn.relu(dots), w)

    def select(self, scores, visible):
        """Top-k of the visible entries -> bool mask [B, S, T]. Ties: lowest entry index first
        (lax.top_k's rule; the cached path's running top-k keeps it, models/cache_reads.py)."""
        t = scores.shape[-1]
        k = min(self.cfg.index_topk, t)
        masked = jnp.where(visible, scores, -jnp.inf)
        _, top = jax.lax.top_k(masked, k)
        chosen = jnp.zeros(scores.shape, bool)
        chosen = jnp.put_along_axis(chosen, top, True, axis=-1, inplace=False)
        return chosen & visible
