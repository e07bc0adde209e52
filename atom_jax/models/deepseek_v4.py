"""The DeepSeek-V4 decoder: embedding expanded to `hc_mult` streams, blocks of
(mHC -> attention -> mHC -> MoE), the HC head, final norm and LM head; plus the MTP block."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.models.attention import Attention
from atom_jax.models.hyper import HyperConnection, HyperHead, hc_merge
from atom_jax.models.layers import const_param, normal_param, rms_norm
from atom_jax.models.moe import MoE
from atom_jax.models.param_map import MTP_KIND
from atom_jax.weights.formats import BF16, NMAJOR, model_layout


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, is_hash: bool, rngs: nnx.Rngs, dtype=jnp.float32,
                 weights: str = BF16, expert_layout: str = NMAJOR):
        self.cfg = cfg
        self.attn_norm = const_param((cfg.hidden_size,), 1.0)
        self.ffn_norm = const_param((cfg.hidden_size,), 1.0)
        self.hc_attn = HyperConnection(cfg, rngs)
        self.hc_ffn = HyperConnection(cfg, rngs)
        self.attn = Attention(cfg, kind, rngs, dtype, weights)
        self.ffn = MoE(cfg, is_hash, rngs, dtype, weights, expert_layout)

    def attn_in(self, streams):
        post, comb, x = self.hc_attn(streams)
        return post, comb, rms_norm(x, self.attn_norm[...], self.cfg.rms_norm_eps)

    def ffn_in(self, streams):
        post, comb, x = self.hc_ffn(streams)
        return post, comb, rms_norm(x, self.ffn_norm[...], self.cfg.rms_norm_eps)

    def attn_in_after(self, streams, block_out, post, comb):
        """The previous block's output merged into the streams (hc_merge), then `attn_in` of the
        result -> (streams, post, comb, x): one kernel for the merge and the mixes on a GPU
        (`HyperConnection.after_merge`)."""
        streams, post, comb, x = self.hc_attn.after_merge(streams, block_out, post, comb)
        return streams, post, comb, rms_norm(x, self.attn_norm[...], self.cfg.rms_norm_eps)

    def ffn_in_after(self, streams, attn_out, post, comb):
        """The attention's output merged into the streams, then `ffn_in` of the result (as
        `attn_in_after`)."""
        streams, post, comb, x = self.hc_ffn.after_merge(streams, attn_out, post, comb)
        return streams, post, comb, rms_norm(x, self.ffn_norm[...], self.cfg.rms_norm_eps)

    def __call__(self, streams, positions, token_ids, moe_backend="ragged_dot"):
        """streams [B,S,N,D] -> [B,S,N,D] (full-sequence attention)."""
        post, comb, x = self.attn_in(streams)
        streams, post, comb, x = self.ffn_in_after(streams, self.attn(x, positions), post, comb)
        b, s, d = x.shape
        y = self.ffn(x.reshape(b * s, d), token_ids.reshape(-1), moe_backend).reshape(b, s, d)
        return hc_merge(streams, y, post, comb)


class DeepseekV4(nnx.Module):
    """Causal LM. `dtype` is the compute / storage dtype of the big matrices; norms, mHC,
    sinks and compressor position biases stay float32 as in DeepSeek's checkpoints. `weights`
    "native" keeps experts FP4 and the attention / shared-expert projections FP8, "fp4-experts"
    only the experts FP4 (packed_params). `expert_layout`: the routed experts' layout, "nmajor"
    or "kmajor" (weights.formats: FP4 codes and dense experts alike)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32, with_mtp: bool = False,
                 weights: str = BF16, expert_layout: str = NMAJOR):
        self.cfg = cfg
        self.dtype = dtype
        self.weights = weights
        self.expert_layout = expert_layout = model_layout(weights, expert_layout)
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([Block(cfg, cfg.attn_kinds[i], cfg.hash_layers[i], rngs, dtype, weights, expert_layout)
                                for i in range(cfg.num_layers)])
        self.hc_head = HyperHead(cfg, rngs)
        self.norm = const_param((cfg.hidden_size,), 1.0)
        self.head = normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nnx.List([MTPBlock(cfg, rngs, dtype, weights, expert_layout) for _ in range(n_mtp)])

    def embed_streams(self, token_ids):
        x = self.embed[...][token_ids]
        return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], self.cfg.hc_mult, x.shape[-1]))

    def logits(self, streams):
        x = rms_norm(self.hc_head(streams), self.norm[...], self.cfg.rms_norm_eps)
        return (x @ self.head[...]).astype(jnp.float32)

    def hidden_streams(self, token_ids, positions=None, moe_backend="ragged_dot"):
        b, s = token_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        streams = self.embed_streams(token_ids)
        for block in self.layers:
            streams = block(streams, positions, token_ids, moe_backend)
        return streams

    def __call__(self, token_ids, moe_backend="ragged_dot"):
        """token_ids [B,S] (a whole sequence from position 0) -> logits [B,S,V] float32."""
        return self.logits(self.hidden_streams(token_ids, moe_backend=moe_backend))

    def mtp_logits(self, token_ids, streams, moe_backend="ragged_dot"):
        """MTP: from the main model's final streams at t and the token at t+1, logits for t+2.

        token_ids [B,S] are the *next* tokens (shifted by one); streams [B,S,N,D]."""
        block = self.mtp[0]
        b, s = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        out = block(self.embed[...][token_ids], streams, positions, token_ids, moe_backend)
        return block.logits(out, self.head[...])


class MTPBlock(nnx.Module):
    """One multi-token-prediction block (DeepSeek-V3 style, on mHC streams): the next token's
    embedding and the main model's streams are normed, projected and summed, then run through
    one decoder block and its own HC head and norm; the LM head is shared with the main model."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32, weights: str = BF16,
                 expert_layout: str = NMAJOR):
        self.cfg = cfg
        d = cfg.hidden_size
        self.enorm = const_param((d,), 1.0)
        self.hnorm = const_param((d,), 1.0)
        self.e_proj = normal_param(rngs, (d, d), dtype)
        self.h_proj = normal_param(rngs, (d, d), dtype)
        self.block = Block(cfg, MTP_KIND, False, rngs, dtype, weights, expert_layout)
        self.hc_head = HyperHead(cfg, rngs)
        self.norm = const_param((d,), 1.0)

    def __call__(self, emb, streams, positions, token_ids, moe_backend="ragged_dot"):
        eps = self.cfg.rms_norm_eps
        e = rms_norm(emb, self.enorm[...], eps) @ self.e_proj[...]
        h = rms_norm(streams, self.hnorm[...], eps) @ self.h_proj[...]
        return self.block(e[..., None, :] + h, positions, token_ids, moe_backend)

    def logits(self, streams, head):
        x = rms_norm(self.hc_head(streams), self.norm[...], self.cfg.rms_norm_eps)
        return (x @ head).astype(jnp.float32)


def jit_forward(model: DeepseekV4, moe_backend: str = "ragged_dot"):
    """A jitted full-sequence forward: split outside, merge inside the traced function."""
    import jax

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, token_ids):
        return nnx.merge(graphdef, state)(token_ids, moe_backend=moe_backend)

    return lambda token_ids: forward(state, jnp.asarray(token_ids))
