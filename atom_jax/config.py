"""DeepSeek-V4 model configuration: one frozen dataclass and the presets.

Reading and writing `config.json` (HF keys, legacy or converted, or DeepSeek's official
`inference/config.json`) is checkpoint I/O: `atom_jax.weights.config_io`.
"""

from __future__ import annotations

import dataclasses
import math

SLIDING, CSA, HCA = "sliding", "csa", "hca"


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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name} must be an int, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
        for name in _POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
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


# sizes and counts that must be positive (the others may be 0: shared experts, MTP layers, ...)
_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank",
                    "o_groups", "o_lora_rank", "sliding_window", "csa_ratio", "hca_ratio", "index_n_heads",
                    "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "hc_mult", "max_position_embeddings")


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
