"""DeepSeek-V4 model configuration.

One frozen dataclass, read from HF `config.json` (model_type deepseek_v4, legacy or
converted keys) or from DeepSeek's official `inference/config.json`, plus presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SLIDING, CSA, HCA = "sliding", "csa", "hca"

_HF_LAYER_TYPE_TO_KIND = {
    "sliding_attention": SLIDING,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
_KIND_TO_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPE_TO_KIND.items()}


class ConfigError(ValueError):
    """A config file or dict that does not describe a DeepSeek-V4 model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # per layer: SLIDING, CSA or HCA
    attn_kinds: tuple[str, ...] = ()
    # per layer: True where routing is by the token-id table (hash MoE)
    hash_layers: tuple[bool, ...] = ()
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    scoring_func: str = "sqrtsoftplus"
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # YaRN on compressed layers: None (plain RoPE) or dict(factor, original_max_position_embeddings,
    # beta_fast, beta_slow)
    compress_rope_scaling: dict | None = None
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        if len(self.attn_kinds) != self.num_layers:
            raise ConfigError(f"attn_kinds has {len(self.attn_kinds)} entries for {self.num_layers} layers")
        if len(self.hash_layers) != self.num_layers:
            raise ConfigError(f"hash_layers has {len(self.hash_layers)} entries for {self.num_layers} layers")
        bad = [k for k in self.attn_kinds if k not in (SLIDING, CSA, HCA)]
        if bad:
            raise ConfigError(f"unknown attention kinds {bad}")
        if self.rope_head_dim > self.head_dim or self.rope_head_dim % 2:
            raise ConfigError(f"rope_head_dim {self.rope_head_dim} must be even and <= head_dim {self.head_dim}")
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise ConfigError("num_heads * head_dim must divide into o_groups")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (only sqrtsoftplus)")

    def ratio(self, layer: int) -> int:
        kind = self.attn_kinds[layer]
        return {SLIDING: 0, CSA: self.csa_ratio, HCA: self.hca_ratio}[kind]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- serialisation -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` form (converted keys), readable by transformers 5.x."""
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta}
        if self.compress_rope_scaling:
            compress = {"rope_type": "yarn", "rope_theta": self.compress_rope_theta, "attention_factor": 1.0,
                        **self.compress_rope_scaling}
        prf = self.rope_head_dim / self.head_dim
        compress["partial_rotary_factor"] = prf
        return {
            "model_type": "deepseek_v4",
            "architectures": ["DeepseekV4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "layer_types": [_KIND_TO_HF_LAYER_TYPE[k] for k in self.attn_kinds],
            "mlp_layer_types": ["hash_moe" if h else "moe" for h in self.hash_layers],
            "compress_rates": {"compressed_sparse_attention": self.csa_ratio,
                               "heavily_compressed_attention": self.hca_ratio},
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": self.scoring_func,
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "partial_rotary_factor": prf,
            "rope_parameters": {
                "main": {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": prf},
                "compress": compress,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("model_type") != "deepseek_v4":
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'deepseek_v4'")
        n = _require(d, "num_hidden_layers")
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
        return cls(
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

    @classmethod
    def from_official_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """DeepSeek's `inference/config.json` keys (`dim`, `n_layers`, `moe_inter_dim`, ...)."""
        from atom_jax.weights.official_config import official_to_hf_dict

        return cls.from_hf_dict(official_to_hf_dict(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if "model_type" in d:
            return cls.from_hf_dict(d)
        if "dim" in d and "n_layers" in d:
            return cls.from_official_dict(d)
        raise ConfigError("config has neither 'model_type' (HF) nor 'dim'/'n_layers' (DeepSeek official)")

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        for name in ("config.json", os.path.join("inference", "config.json")):
            p = os.path.join(path, name)
            if os.path.exists(p):
                with open(p) as f:
                    try:
                        d = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{p}: invalid JSON ({e})") from None
                return cls.from_dict(d)
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


def _flash_kinds(n: int) -> tuple[str, ...]:
    # two sliding-only layers, then CSA / HCA alternating
    return tuple([SLIDING] * min(n, 2) + [CSA if i % 2 == 0 else HCA for i in range(max(n - 2, 0))])


def v4_flash(num_layers: int = 43) -> ModelConfig:
    """DeepSeek-V4-Flash shapes (optionally fewer layers, for benchmarks)."""
    return ModelConfig(
        hidden_size=4096, num_layers=num_layers, num_heads=64, head_dim=512, rope_head_dim=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256, num_experts_per_tok=6,
        moe_intermediate_size=2048, index_n_heads=64, index_head_dim=128, index_topk=512,
        attn_kinds=_flash_kinds(num_layers), hash_layers=tuple(i < 3 for i in range(num_layers)),
        compress_rope_scaling={"factor": 16.0, "original_max_position_embeddings": 65536,
                               "beta_fast": 32.0, "beta_slow": 1.0},
    )


def v4_pro(num_layers: int = 61) -> ModelConfig:
    """DeepSeek-V4-Pro shapes."""
    return ModelConfig(
        hidden_size=7168, num_layers=num_layers, num_heads=128, head_dim=512, rope_head_dim=64,
        q_lora_rank=1536, o_groups=16, o_lora_rank=1024, n_routed_experts=384, num_experts_per_tok=6,
        routed_scaling_factor=2.5,
        moe_intermediate_size=3072, index_n_heads=64, index_head_dim=128, index_topk=1024,
        attn_kinds=tuple([HCA] * min(num_layers, 2)
                         + [CSA if i % 2 == 0 else HCA for i in range(max(num_layers - 2, 0))]),
        hash_layers=tuple(i < 3 for i in range(num_layers)),
        compress_rope_scaling={"factor": 16.0, "original_max_position_embeddings": 65536,
                               "beta_fast": 32.0, "beta_slow": 1.0},
    )


def tiny(vocab_size: int = 512) -> ModelConfig:
    """A few-MB model with every attention kind and both routing kinds (tests, embedded default)."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4, head_dim=32, rope_head_dim=8,
        q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=16,
        attn_kinds=(SLIDING, CSA, HCA, CSA), hash_layers=(True, False, False, False),
        csa_ratio=4, hca_ratio=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        compress_rope_scaling={"factor": 4.0, "original_max_position_embeddings": 256,
                               "beta_fast": 32.0, "beta_slow": 1.0},
        max_position_embeddings=4096,
    )


PRESETS = {"v4-flash": v4_flash, "v4-pro": v4_pro, "tiny": tiny}


def yarn_inv_freq(dim: int, base: float, scaling: dict | None):
    """Inverse frequencies (dim // 2 of them) for plain RoPE or YaRN, as transformers computes them.

    V4 does not scale cos/sin by YaRN's mscale (attention_factor is forced to 1)."""
    import numpy as np

    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / pos_freqs).astype(np.float32)
    if not scaling:
        return inv
    factor = scaling["factor"]
    orig = scaling["original_max_position_embeddings"]

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(scaling.get("beta_fast", 32))), 0)
    high = min(math.ceil(corr_dim(scaling.get("beta_slow", 1))), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrap = 1 - ramp
    interp = (1.0 / (factor * pos_freqs)).astype(np.float32)
    return (interp * (1 - extrap) + inv * extrap).astype(np.float32)
