"""Tensor names: three on-disk layouts -> one canonical layout.

Canonical = DeepSeek's official checkpoint names (as in the released V4 safetensors and the
parameter names of `inference/model.py`), never with a `model.` prefix:

    embed.weight  head.weight  norm.weight  hc_head_fn  hc_head_base  hc_head_scale
    layers.{i}.<block leaf>          (see BLOCK_LEAVES / expert leaves below)
    mtp.{j}.<block leaf> | mtp.{j}.<MTP_LEAVES>

Layouts read:
* "official": canonical names; FP8/FP4 weights come with a `<stem>.scale` (V3 spelling
  `<stem>.weight_scale_inv`) companion, which the reader consumes.
* "hf_saved" (transformers `save_pretrained`): canonical names with a `model.` prefix (not on
  `head.weight`), `model.embed_tokens.weight`, `model.hc_head.hc_{fn,base,scale}`, and
  `attn.norm.weight` where the release says `attn.kv_norm.weight` (transformers' reverse rename).
* "hf_modules" (`DeepseekV4ForCausalLM.state_dict()`): transformers module names, with routed
  experts stacked as `mlp.experts.gate_up_proj` [E, 2I, D] (gate rows, then up rows) and
  `mlp.experts.down_proj` [E, D, I]; those come back as per-expert views.
"""

from __future__ import annotations

import dataclasses
import re

LAYOUT_OFFICIAL = "official"
LAYOUT_HF_SAVED = "hf_saved"
LAYOUT_HF_MODULES = "hf_modules"

TOP_LEVEL = frozenset({"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"})

_COMPRESSOR = ("wkv.weight", "wgate.weight", "ape", "norm.weight")
BLOCK_LEAVES = frozenset(
    ["attn_norm.weight", "ffn_norm.weight"]
    + [f"hc_{part}_{p}" for part in ("attn", "ffn") for p in ("fn", "base", "scale")]
    + [f"attn.{x}" for x in ("wq_a.weight", "q_norm.weight", "wq_b.weight", "wkv.weight", "kv_norm.weight",
                              "wo_a.weight", "wo_b.weight", "attn_sink")]
    + [f"attn.compressor.{x}" for x in _COMPRESSOR]
    + [f"attn.indexer.compressor.{x}" for x in _COMPRESSOR]
    + ["attn.indexer.wq_b.weight", "attn.indexer.weights_proj.weight"]
    + ["ffn.gate.weight", "ffn.gate.bias", "ffn.gate.tid2eid"]
    + [f"ffn.shared_experts.w{k}.weight" for k in (1, 2, 3)]
)
# extra tensors of an MTP block (it also has every block leaf; embed and head are shared)
MTP_LEAVES = frozenset({"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
                        "hc_head_fn", "hc_head_base", "hc_head_scale"})
_EXPERT_LEAF = re.compile(r"ffn\.experts\.(\d+)\.w([123])\.weight")
_BLOCK = re.compile(r"(layers|mtp)\.(\d+)\.(.+)")

# ---- layout "hf_saved" / stray prefixes: aliases applied after dropping "model." --------------
_TOP_ALIASES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_LEAF_ALIASES = {"attn.norm.weight": "attn.kv_norm.weight"}

# ---- layout "hf_modules": transformers module names (conversion_mapping.py, "deepseek_v4") ----
_HF_MODULE_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
_HF_COMPRESSOR = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight",
                  "position_bias": "ape", "kv_norm.weight": "norm.weight"}
_HF_MODULE_LEAVES = {
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.sinks": "attn.attn_sink",
    **{f"self_attn.compressor.{k}": f"attn.compressor.{v}" for k, v in _HF_COMPRESSOR.items()},
    **{f"self_attn.compressor.indexer.{k}": f"attn.indexer.compressor.{v}" for k, v in _HF_COMPRESSOR.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{hc}_hc.{p}": f"hc_{hc}_{p}" for hc in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_HF_PROJ_TO_W = {"gate_proj": 1, "up_proj": 3, "down_proj": 2}
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")  # unstacked form
_HF_STACKED_GATE_UP = "mlp.experts.gate_up_proj"
_HF_STACKED_DOWN = "mlp.experts.down_proj"


@dataclasses.dataclass(frozen=True)
class NameMapping:
    """One canonical tensor taken from a source tensor: `source[select]` (select None = all of it)."""

    canonical: str
    select: tuple | None = None
    shape: tuple[int, ...] | None = None  # shape after select, when the source shape was given


def is_canonical(name: str) -> bool:
    if name in TOP_LEVEL:
        return True
    m = _BLOCK.fullmatch(name)
    if not m:
        return False
    leaf = m[3]
    return leaf in BLOCK_LEAVES or bool(_EXPERT_LEAF.fullmatch(leaf)) or (m[1] == "mtp" and leaf in MTP_LEAVES)


def is_hf_module_name(name: str) -> bool:
    """True for names only the transformers-module layout has (`model.norm.weight` etc. are shared)."""
    return name.startswith("lm_head.") or ".self_attn." in name or ".mlp." in name


def detect_layout(names) -> str:
    """LAYOUT_HF_MODULES if any name is a transformers module name, LAYOUT_HF_SAVED if names carry
    the `model.` prefix, else LAYOUT_OFFICIAL."""
    names = list(names)
    if any(is_hf_module_name(n) for n in names):
        return LAYOUT_HF_MODULES
    if any(n.startswith("model.") for n in names):
        return LAYOUT_HF_SAVED
    return LAYOUT_OFFICIAL


def _stacked(prefix: str, leaf: str, shape) -> list[NameMapping] | None:
    if shape is None or len(shape) != 3:
        return None
    n_exp = shape[0]
    if leaf == _HF_STACKED_GATE_UP:
        if shape[1] % 2:
            return None
        inter = shape[1] // 2
        out = []
        for e in range(n_exp):  # gate rows first (w1), then up rows (w3)
            out.append(NameMapping(f"{prefix}ffn.experts.{e}.w1.weight", (e, slice(0, inter)), (inter, shape[2])))
            out.append(NameMapping(f"{prefix}ffn.experts.{e}.w3.weight", (e, slice(inter, 2 * inter)),
                                   (inter, shape[2])))
        return out
    return [NameMapping(f"{prefix}ffn.experts.{e}.w2.weight", (e,), (shape[1], shape[2])) for e in range(n_exp)]


def map_name(name: str, shape=None) -> list[NameMapping] | None:
    """Canonical tensors a source tensor provides (several for stacked experts), or None when the
    name belongs to no known layout. `shape` (the stored shape) is needed for stacked experts."""
    shape = None if shape is None else tuple(shape)
    if name in _HF_MODULE_TOP:
        return [NameMapping(_HF_MODULE_TOP[name], None, shape)]
    n = name[len("model."):] if name.startswith("model.") else name
    n = _TOP_ALIASES.get(n, n)
    m = _BLOCK.fullmatch(n)
    if m:
        prefix, leaf = f"{m[1]}.{m[2]}.", m[3]
        if leaf in (_HF_STACKED_GATE_UP, _HF_STACKED_DOWN):
            return _stacked(prefix, leaf, shape)
        if leaf in _HF_MODULE_LEAVES:
            leaf = _HF_MODULE_LEAVES[leaf]
        elif em := _HF_EXPERT.fullmatch(leaf):
            leaf = f"ffn.experts.{em[1]}.w{_HF_PROJ_TO_W[em[2]]}.weight"
        else:
            leaf = _LEAF_ALIASES.get(leaf, leaf)
        n = prefix + leaf
    if not is_canonical(n):
        return None
    return [NameMapping(n, None, shape)]


def companion_stem(name: str) -> tuple[str, str] | None:
    """For a quantisation-scale name, (the weight it belongs to, spelling); None otherwise.

    `x.scale` -> `x.weight` (DeepSeek V4), `x.weight_scale_inv` -> `x.weight` (V3 HF). Whether the
    weight exists decides if it really is a companion (transformers' `attn_hc.scale` is not)."""
    if name.endswith(".weight_scale_inv"):
        return name[: -len("_scale_inv")], "weight_scale_inv"
    if name.endswith(".scale"):
        return name[: -len(".scale")] + ".weight", "scale"
    return None
