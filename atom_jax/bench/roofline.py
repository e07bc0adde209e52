"""Cost-model helpers shared by the step benchmarks: FLOPs and bytes a step must at least move,
and the floor they give against device ceilings measured in the same run
(`timing.device_ceilings`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atom_jax.config import CSA, HCA, ModelConfig


def param_bytes_per_rank(params) -> int:
    """Bytes of parameters one rank holds (first addressable shard of every leaf)."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards[:1])


def prefill_flops(cfg: ModelConfig, n: int) -> float:
    """Per rank, per step of n prefill tokens: 2 * MACs of projections, active experts and
    causal attention (bounded by the sliding window)."""
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    proj = d * cfg.q_lora_rank + cfg.q_lora_rank * h * hd + d * hd + h * hd * cfg.o_lora_rank + \
        cfg.o_groups * cfg.o_lora_rank * d
    moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    per_tok = (proj + moe) * cfg.num_layers
    attn = sum(2 * h * hd * min(n / 2, cfg.sliding_window) for _ in range(cfg.num_layers))
    return 2 * n * (per_tok + attn)


def decode_kv_bytes(cfg: ModelConfig, context: int, dtype) -> int:
    """Cache bytes one decode token reads at `context`: the sliding window plus the CSA entries
    the indexer selects and every HCA entry, per layer."""
    rows = 0
    for kind in cfg.attn_kinds:
        rows += cfg.sliding_window + (min(cfg.index_topk, context // cfg.csa_ratio) if kind == CSA else
                                      context // cfg.hca_ratio if kind == HCA else 0)
    return rows * cfg.head_dim * jnp.dtype(dtype).itemsize


def step_floor(ceilings: dict, bytes_moved: float, flops: float = 0.0) -> float:
    """Seconds: the larger of the byte floor (copy bandwidth) and the FLOP floor (bf16 matmul)."""
    byte_floor = bytes_moved / (ceilings["copy_GBps"] * 1e9)
    flop_floor = flops / (ceilings["matmul_TFLOPs"] * 1e12) if flops else 0.0
    return max(byte_floor, flop_floor)
