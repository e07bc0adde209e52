"""Tiny random transformers DeepSeek-V4 models, the reference for parity tests."""

from __future__ import annotations

import numpy as np


def hf_tiny_kwargs(variant: str) -> dict:
    if variant == "a":  # YaRN, short HCA ratio so a short sequence has many HCA windows
        return dict(
            vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8,
            compress_ratios=[0, 4, 128, 4], num_hash_layers=2, sliding_window=16, o_groups=2, o_lora_rank=16,
            # 16 indexer heads: with few heads relu(.) zeroes whole scores and top-k meets exact ties,
            # which torch and XLA break differently
            index_n_heads=16, index_head_dim=16, index_topk=4, qk_rope_head_dim=8,
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
            rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                             "beta_fast": 32, "beta_slow": 1},
        )
    if variant == "b":  # the released ratios (4 / 128), plain RoPE, other widths, converted keys
        return dict(
            vocab_size=300, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=5,
            num_attention_heads=2, head_dim=64, q_lora_rank=24, num_experts_per_tok=3, n_routed_experts=6,
            layer_types=["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention",
                         "heavily_compressed_attention", "compressed_sparse_attention"],
            mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe", "moe"],
            sliding_window=24, o_groups=2, o_lora_rank=12, index_n_heads=16, index_head_dim=32, index_topk=6,
            qk_rope_head_dim=16, routed_scaling_factor=2.5, hc_mult=3, hc_sinkhorn_iters=7,
        )
    raise ValueError(variant)


def make_hf_model(variant: str, seed: int):
    """A transformers model whose zero- or one-initialised tensors are randomised too, so every
    path (sinks, position biases, norms, HC biases, routing bias, hash table) matters."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**hf_tiny_kwargs(variant))
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("sinks", "position_bias", "base")):
                p.normal_(0, 0.5)
            elif name.endswith("scale"):
                p.normal_(1, 0.3)
            elif "norm" in name:
                p.normal_(1, 0.2)
        for name, b in model.named_buffers():
            if "tid2eid" in name:
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]))
            elif "e_score_correction_bias" in name:
                b.normal_(0, 0.5)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids), use_cache=False).logits.float().numpy()
