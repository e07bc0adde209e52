"""Checkpoint config files <-> `ModelConfig`: HF `config.json` (model_type deepseek_v4, legacy
or converted keys, as transformers 5.x reads it) and DeepSeek's official `inference/config.json`
(through `official_config.official_to_hf_dict`)."""

from __future__ import annotations

import json
import os
from typing import Any

from atom_jax.config import CSA, HCA, SLIDING, ConfigError, ModelConfig
from atom_jax.weights.official_config import official_to_hf_dict

_HF_LAYER_TYPE_TO_KIND = {
    "sliding_attention": SLIDING,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
_KIND_TO_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPE_TO_KIND.items()}


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` form (converted keys), readable by transformers 5.x."""
    compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta}
    if cfg.compress_rope_scaling:
        compress = {"rope_type": "yarn", "rope_theta": cfg.compress_rope_theta, "attention_factor": 1.0,
                    **cfg.compress_rope_scaling}
    prf = cfg.rope_head_dim / cfg.head_dim
    compress["partial_rotary_factor"] = prf
    return {
        "model_type": "deepseek_v4",
        "architectures": ["DeepseekV4ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window,
        "layer_types": [_KIND_TO_HF_LAYER_TYPE[k] for k in cfg.attn_kinds],
        "mlp_layer_types": ["hash_moe" if h else "moe" for h in cfg.hash_layers],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_ratio,
                           "heavily_compressed_attention": cfg.hca_ratio},
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.scoring_func,
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "partial_rotary_factor": prf,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": prf},
            "compress": compress,
        },
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    }


def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """An HF `config.json` dict (legacy or converted keys) -> ModelConfig."""
    if d.get("model_type") != "deepseek_v4":
        raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'deepseek_v4'")
    n = _require(d, "num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_hidden_layers must be an int > 0, got {n!r}")
    rates = dict(d.get("compress_rates") or {})
    csa = int(d.get("compress_rate_csa", rates.get("compressed_sparse_attention", 4)))
    hca = int(d.get("compress_rate_hca", rates.get("heavily_compressed_attention", 128)))
    if d.get("layer_types") is not None:
        try:
            kinds = [_HF_LAYER_TYPE_TO_KIND[t] for t in d["layer_types"]]
        except KeyError as e:
            raise ConfigError(f"unknown layer type {e.args[0]!r} in layer_types") from None
    elif d.get("compress_ratios") is not None:
        kinds = _kinds_from_ratios(d["compress_ratios"], csa, hca)
    else:  # transformers' default: two HCA layers, then HCA/CSA interleaved
        kinds = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if d.get("mlp_layer_types") is not None:
        hashes = [t == "hash_moe" for t in d["mlp_layer_types"]]
    else:
        nh = int(d.get("num_hash_layers", 3))
        hashes = [i < nh for i in range(n)]
    head_dim = int(d.get("head_dim", 512))
    if d.get("qk_rope_head_dim") is not None:
        rope_dim = int(d["qk_rope_head_dim"])
    elif d.get("partial_rotary_factor") is not None:
        rope_dim = int(head_dim * d["partial_rotary_factor"])
    else:
        rope_dim = 64
    rope_theta = float(d.get("rope_theta", 10000.0))
    compress_theta = float(d.get("compress_rope_theta", 160000.0))
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    comp = rp.get("compress", rp) if isinstance(rp, dict) else {}
    if isinstance(rp.get("main"), dict):
        rope_theta = float(rp["main"].get("rope_theta", rope_theta))
    if isinstance(rp.get("compress"), dict):
        compress_theta = float(rp["compress"].get("rope_theta", compress_theta))
    yarn = None
    if comp.get("rope_type", comp.get("type")) == "yarn":
        yarn = {
            "factor": float(comp["factor"]),
            "original_max_position_embeddings": int(comp["original_max_position_embeddings"]),
            "beta_fast": float(comp.get("beta_fast") or 32),
            "beta_slow": float(comp.get("beta_slow") or 1),
        }
    eos = d.get("eos_token_id", 1)
    return ModelConfig(
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=int(_require(d, "hidden_size")),
        num_layers=int(n),
        num_heads=int(_require(d, "num_attention_heads")),
        head_dim=head_dim,
        rope_head_dim=rope_dim,
        q_lora_rank=int(d.get("q_lora_rank", 1024)),
        o_groups=int(d.get("o_groups", 8)),
        o_lora_rank=int(d.get("o_lora_rank", 1024)),
        sliding_window=int(d.get("sliding_window", 128)),
        attn_kinds=tuple(kinds[:n]),
        hash_layers=tuple(hashes[:n]),
        csa_ratio=csa,
        hca_ratio=hca,
        index_n_heads=int(d.get("index_n_heads", 64)),
        index_head_dim=int(d.get("index_head_dim", 128)),
        index_topk=int(d.get("index_topk", 512)),
        n_routed_experts=int(_require(d, "n_routed_experts")),
        n_shared_experts=int(d.get("n_shared_experts", 1)),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 6)),
        moe_intermediate_size=int(_require(d, "moe_intermediate_size")),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.5)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        scoring_func=str(d.get("scoring_func", "sqrtsoftplus")),
        swiglu_limit=float(d.get("swiglu_limit", 10.0)),
        hc_mult=int(d.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(d.get("hc_eps", 1e-6)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        compress_rope_theta=compress_theta,
        compress_rope_scaling=yarn,
        max_position_embeddings=int(d.get("max_position_embeddings", 1048576)),
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", 1)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id", 0),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


def from_official_dict(d: dict[str, Any]) -> ModelConfig:
    """DeepSeek's `inference/config.json` keys (`dim`, `n_layers`, `moe_inter_dim`, ...)."""
    return from_hf_dict(official_to_hf_dict(d))


def from_dict(d: dict[str, Any]) -> ModelConfig:
    """An HF or a DeepSeek-official config dict -> ModelConfig. ConfigError (naming the key
    where it can) for anything that does not describe a model: missing keys, wrong types
    (`"4"` for 4), values out of range."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    try:
        if "model_type" in d:
            return from_hf_dict(d)
        if "dim" in d and "n_layers" in d:
            return from_official_dict(d)
    except ValueError as e:  # ConfigError and OfficialConfigError included
        raise ConfigError(str(e)) from None
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        raise ConfigError(f"config has a value of the wrong type or shape ({type(e).__name__}: {e})") from None
    raise ConfigError("config has neither 'model_type' (HF) nor 'dim'/'n_layers' (DeepSeek official)")


def read_config(path: str) -> ModelConfig:
    """A checkpoint directory's `config.json` (or official `inference/config.json`) -> ModelConfig."""
    for name in ("config.json", os.path.join("inference", "config.json")):
        p = os.path.join(path, name)
        if os.path.exists(p):
            with open(p) as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}: invalid JSON ({e})") from None
            return from_dict(d)
    raise ConfigError(f"no config.json in {path}")


def _require(d: dict, key: str):
    if key not in d:
        raise ConfigError(f"config is missing required key {key!r}")
    return d[key]


def _kinds_from_ratios(ratios, csa: int, hca: int) -> list[str]:
    kinds = []
    for r in ratios:
        r = int(r)
        if r == 0:
            kinds.append(SLIDING)
        elif r == 4 or r == csa:
            kinds.append(CSA)
        elif r == 128 or r == hca:
            kinds.append(HCA)
        else:
            raise ConfigError(f"compress ratio {r} is neither 0, the CSA ratio nor the HCA ratio")
    return kinds
