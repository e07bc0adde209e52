"""DeepSeek's official `inference/config.json` (the `ModelArgs` of `inference/model.py`) -> the HF
`config.json` form (model_type "deepseek_v4"), as transformers' `DeepseekV4Config` and
`atom_jax.weights.config_io.from_hf_dict` read it.

Official `compress_ratios` has one entry per block *including* the MTP blocks (layer ids
n_layers.. are MTP); it is passed through whole, as the released HF `config.json` does, and HF
readers take the first `num_hidden_layers` entries.
"""

from __future__ import annotations

from typing import Any


class OfficialConfigError(ValueError):
    """An official config dict that cannot describe a DeepSeek-V4 model."""


# official key -> HF key, values copied unchanged
_RENAMES = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "window_size": "sliding_window",
    "n_hash_layers": "num_hash_layers",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size",
    "route_scale": "routed_scaling_factor",
    "score_func": "scoring_func",
    "swiglu_limit": "swiglu_limit",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "n_mtp_layers": "num_nextn_predict_layers",
    "expert_dtype": "expert_dtype",
}
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "moe_inter_dim", "n_routed_experts")
# CSA layers are the ratio-4 ones (overlapping windows + indexer, model.py: `compress_ratio == 4`)
CSA_RATIO = 4


def _compress_rates(ratios: list[int]) -> dict[str, int]:
    others = sorted({r for r in ratios if r not in (0, CSA_RATIO)})
    if len(others) > 1:
        raise OfficialConfigError(f"compress_ratios {ratios} has more than one heavy-compression ratio {others}")
    return {"compressed_sparse_attention": CSA_RATIO,
            "heavily_compressed_attention": others[0] if others else 128}


def official_to_hf_dict(d: dict[str, Any]) -> dict[str, Any]:
    """Convert official V4 `inference/config.json` keys to HF `config.json` keys.

    Runtime-only keys (max_batch_size, max_seq_len, dtype, scale_fmt, scale_dtype) are not model
    properties; `dtype: "fp8"` becomes the HF `quantization_config` DeepSeek ships. V3-only keys
    (inter_dim, n_dense_layers) do not exist in V4: every V4 block is MoE."""
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise OfficialConfigError(f"official config is missing {missing}")
    if int(d.get("n_dense_layers", 0) or 0):
        raise OfficialConfigError("n_dense_layers > 0 is a V3 config; DeepSeek-V4 has no dense blocks")
    hf: dict[str, Any] = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
                          "num_key_value_heads": 1}
    for src, dst in _RENAMES.items():
        if src in d:
            hf[dst] = d[src]
    score = d.get("score_func", "sqrtsoftplus")
    hf["scoring_func"] = score
    # model.py Gate: weights are renormalised over the top-k unless scores are a softmax
    hf["norm_topk_prob"] = score != "softmax"
    if "compress_ratios" in d:
        ratios = [int(r) for r in d["compress_ratios"]]
        bad = [r for r in ratios if r < 0]
        if bad or len(ratios) < int(d["n_layers"]):
            raise OfficialConfigError(f"compress_ratios {ratios} must be >= 0 with at least n_layers "
                                      f"({d['n_layers']}) entries")
        hf["compress_ratios"] = ratios
        hf["compress_rates"] = _compress_rates(ratios)
    factor = float(d.get("rope_factor", 1.0) or 1.0)
    orig = int(d.get("original_seq_len", 0) or 0)
    # model.py applies YaRN (compressed layers only) when original_seq_len > 0
    if factor > 1.0 and orig > 0:
        hf["rope_parameters"] = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": orig,
            "beta_fast": d.get("beta_fast", 32),
            "beta_slow": d.get("beta_slow", 1),
        }
        hf["max_position_embeddings"] = int(orig * factor)
    elif orig > 0:
        hf["max_position_embeddings"] = orig
    if d.get("dtype", "fp8") == "fp8":
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        scale_fmt = d.get("scale_fmt", "ue8m0")
        if scale_fmt is not None:  # None = float32 scales (V3 style)
            qc["scale_fmt"] = scale_fmt
        hf["quantization_config"] = qc
    return hf
