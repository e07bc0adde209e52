"""Where each canonical checkpoint tensor (DeepSeek's official names, no `model.` prefix) lives
in the NNX model, and how it is laid out there (our matrices are [in, out])."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from atom_jax.config import CSA, SLIDING, ModelConfig
from atom_jax.models.compressor import projection_columns
from atom_jax.models.packed_params import FUSED, fused_offsets, fused_widths
from atom_jax.weights.reader import FP4, FP8

# DeepSeek's released MTP blocks: sliding-window attention, learned routing
MTP_KIND = SLIDING


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple  # attribute names / list indices from the model root
    transform: Callable[[np.ndarray], np.ndarray]
    expert: int | None = None  # set for one expert's slice of a stacked [E, ...] parameter
    integer: bool = False
    # FP8 / FP4: kept packed under `--weights native` (packed_params): then the parameter holds the
    # codes (FP8 [out, in] as stored; FP4 transposed to [in/2, out]) and `<leaf>_scale` the scales
    native: str | None = None
    # set for one matrix of a fused parameter (several checkpoint matrices that take the same
    # input, one matmul at run time: the attention's `wcomp`, packed_params.FUSED): (this one's
    # index, every part's width)
    part: tuple[int, tuple[int, ...]] | None = None

    def span(self, fp8: bool = False) -> tuple[int, int]:
        """A fused part's (start, stop) along the parameter's output axis: its columns in the
        float [in, out] form, its rows in the FP8 [out, in] form (packed_params.fused_offsets)."""
        i, widths = self.part
        return fused_offsets(widths, fp8)[i]


def _t(a):
    return np.ascontiguousarray(a.T)


def _same(a):
    return a



def _wo_a(groups):
    def f(a):  # [G*o_lora, in_per_group] -> [G, in_per_group, o_lora]
        return np.ascontiguousarray(a.reshape(groups, -1, a.shape[-1]).transpose(0, 2, 1))
    return f


def _dense(cfg: ModelConfig, path: tuple, name: str) -> Target:
    """An FP8 projection `name` of the module at `path`: its own parameter, or its part of a
    fused one (packed_params.FUSED)."""
    fused = next((k for k, parts in FUSED.items() if name in parts), None)
    if fused is None:
        return Target(path + (name,), _t, native=FP8)
    return Target(path + (fused,), _t, native=FP8, part=(FUSED[fused].index(name), fused_widths(cfg, fused)))


def _compressors(cfg: ModelConfig, kind: str, a: str, ap: tuple) -> dict[str, Target]:
    """A compressed layer's compressors (and its indexer's head weights): their projections are
    column blocks of the attention's fused `wcomp`, in `projection_columns` order."""
    names = [f"{a}.compressor.wkv.weight", f"{a}.compressor.wgate.weight"]
    if kind == CSA:
        names += [f"{a}.indexer.compressor.wkv.weight", f"{a}.indexer.compressor.wgate.weight",
                  f"{a}.indexer.weights_proj.weight"]
    widths = projection_columns(cfg, kind)
    m = {name: Target(ap + ("wcomp",), _t, part=(i, widths)) for i, name in enumerate(names)}
    assert len(names) == len(widths)
    for prefix, path in [(f"{a}.compressor", ap + ("compressor",))] + (
            [(f"{a}.indexer.compressor", ap + ("indexer", "compressor"))] if kind == CSA else []):
        m[f"{prefix}.ape"] = Target(path + ("ape",), _same)
        m[f"{prefix}.norm.weight"] = Target(path + ("norm",), _same)
    return m


def _block(cfg: ModelConfig, kind: str, is_hash: bool, prefix: str, path: tuple) -> dict[str, Target]:
    m: dict[str, Target] = {}
    a, f = prefix + ".attn", prefix + ".ffn"
    ap, fp = path + ("attn",), path + ("ffn",)
    m[f"{prefix}.attn_norm.weight"] = Target(path + ("attn_norm",), _same)
    m[f"{prefix}.ffn_norm.weight"] = Target(path + ("ffn_norm",), _same)
    for site in ("attn", "ffn"):
        m[f"{prefix}.hc_{site}_fn"] = Target(path + (f"hc_{site}", "fn"), _t)
        m[f"{prefix}.hc_{site}_base"] = Target(path + (f"hc_{site}", "base"), _same)
        m[f"{prefix}.hc_{site}_scale"] = Target(path + (f"hc_{site}", "scale"), _same)
    m.update({
        f"{a}.wq_a.weight": _dense(cfg, ap, "wq_a"),
        f"{a}.q_norm.weight": Target(ap + ("q_norm",), _same),
        f"{a}.wq_b.weight": Target(ap + ("wq_b",), _t, native=FP8),
        f"{a}.wkv.weight": _dense(cfg, ap, "wkv"),
        f"{a}.kv_norm.weight": Target(ap + ("kv_norm",), _same),
        f"{a}.wo_a.weight": Target(ap + ("wo_a",), _wo_a(cfg.o_groups), native=FP8),
        f"{a}.wo_b.weight": Target(ap + ("wo_b",), _t, native=FP8),
        f"{a}.attn_sink": Target(ap + ("sinks",), _same),
    })
    if kind != SLIDING:
        m.update(_compressors(cfg, kind, a, ap))
    if kind == CSA:
        m[f"{a}.indexer.wq_b.weight"] = Target(ap + ("indexer", "wq_b"), _t)
    m[f"{f}.gate.weight"] = Target(fp + ("gate_w",), _t)
    if is_hash:
        m[f"{f}.gate.tid2eid"] = Target(fp + ("tid2eid",), _same, integer=True)
    else:
        m[f"{f}.gate.bias"] = Target(fp + ("gate_bias",), _same)
    for e in range(cfg.n_routed_experts):
        for w in ("w1", "w2", "w3"):
            m[f"{f}.experts.{e}.{w}.weight"] = Target(fp + (w,), _t, expert=e, native=FP4)
    for w in ("w1", "w2", "w3"):
        m[f"{f}.shared_experts.{w}.weight"] = _dense(cfg, fp, f"s_{w}")
    return m


def param_map(cfg: ModelConfig, with_mtp: bool = False) -> dict[str, Target]:
    m: dict[str, Target] = {
        "embed.weight": Target(("embed",), _same),
        "head.weight": Target(("head",), _t),
        "norm.weight": Target(("norm",), _same),
        "hc_head_fn": Target(("hc_head", "fn"), _t),
        "hc_head_base": Target(("hc_head", "base"), _same),
        "hc_head_scale": Target(("hc_head", "scale"), _same),
    }
    for i in range(cfg.num_layers):
        m.update(_block(cfg, cfg.attn_kinds[i], cfg.hash_layers[i], f"layers.{i}", ("layers", i)))
    if with_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            p, root = f"mtp.{j}", ("mtp", j)
            m.update(_block(cfg, MTP_KIND, False, p, root + ("block",)))
            m.update({
                f"{p}.enorm.weight": Target(root + ("enorm",), _same),
                f"{p}.hnorm.weight": Target(root + ("hnorm",), _same),
                f"{p}.e_proj.weight": Target(root + ("e_proj",), _t),
                f"{p}.h_proj.weight": Target(root + ("h_proj",), _t),
                f"{p}.norm.weight": Target(root + ("norm",), _same),
                f"{p}.hc_head_fn": Target(root + ("hc_head", "fn"), _t),
                f"{p}.hc_head_base": Target(root + ("hc_head", "base"), _same),
                f"{p}.hc_head_scale": Target(root + ("hc_head", "scale"), _same),
            })
    return m


MTP_NAME = re.compile(r"^mtp\.")
