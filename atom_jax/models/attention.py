"""DeepSeek-V4 attention: shared-KV MQA (one 512-wide head used as key and value), low-rank
queries with a weightless per-head norm, partial interleaved RoPE, a sliding window, compressed
entries (CSA / HCA), per-head sinks, inverse RoPE on the output, grouped low-rank output.

`attend` is the core both the full-sequence and the cached paths call: queries against an
explicit key set with an explicit visibility mask, so the cache only has to supply keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atom_jax.config import CSA, HCA, SLIDING, ModelConfig
from atom_jax.models.compressor import Compressor, Indexer, projection_columns, visible_entries
from atom_jax.kernels.packed import fp8_grouped_linear
from atom_jax.models import packed_params as pp
from atom_jax.models.layers import (apply_rope, const_param, normal_param, rms_norm, rope_cos_sin, rope_inv_freq,
                                    split_columns)
from atom_jax.models.trace_once import traced_once
from atom_jax.weights import formats


def attend(q, keys, visible, sinks, scale):
    """q [B,S,H,D]; keys [B,K,D] (also the values); visible bool [B,S,K]; sinks [H] -> [B,S,H,D].

    Softmax over the keys plus one sink logit per head whose probability is dropped. The
    products take the inputs' dtype (bf16 runs on the tensor cores) and accumulate in float32.
    The sink joins the max and the denominator only: appending it to the [B, H, S, K] float32
    logits (the softmax of the concatenation) cost a copy of them, ~4.3 GB per V4-Pro layer at
    8K tokens per rank."""
    keys = keys.astype(q.dtype)
    logits = jnp.einsum("bshd,bkd->bhsk", q, keys, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    sink = sinks.astype(jnp.float32)[None, :, None, None]
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink))
    e = jnp.exp(logits - top)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bhsk,bkd->bshd", probs.astype(q.dtype), keys, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def sliding_visible(q_pos, k_pos, window):
    """Key at position p is visible to query t iff t - window < p <= t. -> bool [B,S,K]."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    return (diff >= 0) & (diff < window)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, dtype=jnp.float32, weights: str = formats.BF16):
        self.cfg = cfg
        self.kind = kind
        self.ratio = {SLIDING: 0, CSA: cfg.csa_ratio, HCA: cfg.hca_ratio}[kind]
        h, d = cfg.num_heads, cfg.head_dim
        # [in, out]; grouped output: wo_a [G, H*D/G, o_lora] then wo_b [G*o_lora, hidden]
        shapes = {"wq_b": (cfg.q_lora_rank, h * d), "wo_b": (cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)}
        fp8 = formats.packed_dense(weights)
        # the input's query down projection and kv projection: one fused parameter (packed_params.FUSED)
        pp.fused_matrix(self, "wqkv", rngs, cfg.hidden_size, dtype, fp8)
        for name, (i, o) in shapes.items():
            if fp8:  # FP8 codes [out, in] + block scales (packed_params)
                codes, scale = pp.fp8_matrix(rngs, i, o)
                setattr(self, name, codes)
                setattr(self, name + pp.SCALE, scale)
            else:
                setattr(self, name, normal_param(rngs, (i, o), dtype))
        if fp8:  # the checkpoint's [G*o_lora, H*D/G], unscrambled at use
            self.wo_a, self.wo_a_scale = pp.fp8_matrix(rngs, h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)
        else:
            self.wo_a = normal_param(rngs, (cfg.o_groups, h * d // cfg.o_groups, cfg.o_lora_rank), dtype)
        self.q_norm = const_param((cfg.q_lora_rank,), 1.0)
        self.kv_norm = const_param((d,), 1.0)
        self.sinks = const_param((h,), 0.0)
        if self.kind != SLIDING:
            # the compressors' (and the indexer's head weights') projections, fused (compressor.py)
            self.wcomp = normal_param(rngs, (cfg.hidden_size, sum(projection_columns(cfg, kind))), dtype)
            self.compressor = Compressor(cfg, self.ratio, d, self.kind == CSA)
        if self.kind == CSA:
            self.indexer = Indexer(cfg, rngs, dtype)

    @property
    def inv_freq(self):
        # a trace-time constant; kept off the module so nnx never treats it as state
        return rope_inv_freq(self.cfg, compressed=self.kind != SLIDING)

    # ---- pieces shared with the cached path ------------------------------------------------
    def project_in(self, x):
        """x [..., D] -> (x @ wq_a [..., R], x @ wkv [..., hd]): the input projections that
        `queries` and `keys` take, by one matmul (the fused `wqkv`)."""
        return pp.fused_linear(x, self, "wqkv")

    def query_heads(self, q_a):
        """q_a [B,S,R] (`project_in`'s first) -> (q [B,S,H,hd] as projected, before its per-head norm
        and RoPE; q_lora [B,S,R] for the indexer)."""
        cfg = self.cfg
        b, s, _ = q_a.shape
        q_lora = rms_norm(q_a, self.q_norm[...], cfg.rms_norm_eps)
        return pp.linear(q_lora, self, "wq_b").reshape(b, s, cfg.num_heads, cfg.head_dim), q_lora

    def queries(self, q_a, positions):
        """q_a [B,S,R] (`project_in`'s first) -> (q [B,S,H,hd] normed and roped, q_lora [B,S,R])."""
        q, q_lora = self.query_heads(q_a)
        q = rms_norm(q, None, self.cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return apply_rope(q, cos[:, :, None], sin[:, :, None]), q_lora

    def compressor_projections(self, x):
        """x [..., D] -> [..., sum(projection_columns)] in x's dtype: every compressor's kv and
        gate projections, then (CSA) the indexer's head weights, by one matmul."""
        return x @ self.wcomp[...]

    def keys(self, kv_a, positions):
        """kv_a [B,S,hd] (`project_in`'s second) -> sliding-window key/value rows [B,S,hd], roped."""
        kv = rms_norm(kv_a, self.kv_norm[...], self.cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return apply_rope(kv, cos, sin)

    def output(self, attn, positions):
        """attn [B,S,H,hd] -> [B,S,hidden]: undo RoPE at the query position, grouped projection."""
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return self.project_out(apply_rope(attn, cos[:, :, None], sin[:, :, None], inverse=True))

    def project_out(self, attn):
        """attn [B,S,H,hd] with its RoPE undone -> [B,S,hidden]: the grouped output projection."""
        cfg = self.cfg
        b, s = attn.shape[:2]
        grouped = attn.reshape(b, s, cfg.o_groups, -1)
        if hasattr(self, "wo_a_scale"):  # FP8, stacked as the checkpoint's [G*o_lora, H*D/G]
            mid = fp8_grouped_linear(grouped, self.wo_a[...], self.wo_a_scale[...], cfg.o_groups)
        else:
            mid = jnp.einsum("bsgi,gio->bsgo", grouped, self.wo_a[...])
        return pp.linear(mid.reshape(b, s, -1), self, "wo_b")

    # ---- full-sequence forward ---------------------------------------------------------------
    @traced_once
    def __call__(self, x, positions, prefix=None):
        """x [B,S,D] at `positions` [B,S] -> [B,S,D].

        Without `prefix` the rows start at position 0. With `prefix` [B,P,D] (this layer's
        attention input for positions 0..P-1 of the same rows) x continues those rows at P: this
        is how a micro-batch cut inside a request attends to the part the other chain holds."""
        cfg = self.cfg
        if prefix is None:
            kv_x, kv_pos = x, positions
        else:
            p = prefix.shape[1]
            kv_x = jnp.concatenate([prefix, x], axis=1)
            kv_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (x.shape[0], p)), positions], axis=1)
        q_a, kv_a = self.project_in(kv_x)
        q, q_lora = self.queries(q_a[:, kv_x.shape[1] - x.shape[1]:], positions)  # x's rows (after the prefix)
        keys = self.keys(kv_a, kv_pos)
        visible = sliding_visible(positions, kv_pos, cfg.sliding_window)
        if self.kind != SLIDING:
            proj = split_columns(self.compressor_projections(kv_x), projection_columns(cfg, self.kind))
            entries = self.compressor.full_sequence(proj[0], proj[1], self.inv_freq).astype(keys.dtype)
            seen = visible_entries(positions, entries.shape[1], self.ratio)
            if self.kind == CSA and entries.shape[1] > 0:
                ikeys = self.indexer.compressor.full_sequence(proj[2], proj[3], self.inv_freq)
                head_proj = proj[4][:, kv_x.shape[1] - x.shape[1]:]  # x's rows (after the prefix)
                scores = self.indexer.scores(head_proj, q_lora, positions, ikeys, self.inv_freq)
                seen = self.indexer.select(scores, seen)
            keys = jnp.concatenate([keys, entries], axis=1)
            visible = jnp.concatenate([visible, seen], axis=-1)
        out = attend(q, keys, visible, self.sinks[...], cfg.head_dim ** -0.5)
        return self.output(out, positions)
