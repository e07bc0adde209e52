"""Where parameters live: everything replicated except the routed experts, which are sharded
over `dp` by expert (each rank holds E/dp whole experts) or by intermediate dim (each rank
holds a slice of every expert)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.sharding.mesh import DP
from atom_jax.weights.formats import KMAJOR, NMAJOR, packed_experts

BY_EXPERT, BY_INTERMEDIATE = "expert", "intermediate"
EXPERT_MODES = (BY_EXPERT, BY_INTERMEDIATE)

# routed expert stacks: w1/w3 [E, D, I], w2 [E, I, D]; packed FP4 (`--weights native` or
# `fp4-experts`) keeps the same axes: codes w1 [E, D/2, I] and scales w1_scale [E, D/32, I],
# likewise w2 [E, I/2, D] ... K-major FP4 codes (`--expert-layout kmajor`) swap the codes' last
# two axes (w1 [E, I, D/2], w2 [E, D, I/2]; the scales as above), so their specs swap them too.
_DENSE_EXPERT_SPECS = {
    BY_EXPERT: {"w1": P(DP, None, None), "w3": P(DP, None, None), "w2": P(DP, None, None)},
    BY_INTERMEDIATE: {"w1": P(None, None, DP), "w3": P(None, None, DP), "w2": P(None, DP, None)},
}
_EXPERT_SPECS = {mode: {**specs, **{k + "_scale": v for k, v in specs.items()}}
                 for mode, specs in _DENSE_EXPERT_SPECS.items()}
_KMAJOR_CODE_SPECS = {mode: {k: P(*s[:-2], s[-1], s[-2]) for k, s in specs.items()}
                      for mode, specs in _DENSE_EXPERT_SPECS.items()}


def param_specs(pure_params: dict, mode: str = BY_EXPERT, expert_layout: str = NMAJOR):
    """PartitionSpecs matching a pure param dict (nnx `State.to_pure_dict()`) of a model whose
    FP4 experts (if any) hold codes in `expert_layout` (the model's `expert_layout`)."""
    if mode not in EXPERT_MODES:
        raise ValueError(f"expert sharding mode {mode!r}; choose from {EXPERT_MODES}")
    by_name = _EXPERT_SPECS[mode]
    if expert_layout == KMAJOR:
        by_name = {**by_name, **_KMAJOR_CODE_SPECS[mode]}

    def spec(path, leaf):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if len(keys) >= 2 and keys[-2] == "ffn" and keys[-1] in by_name:
            return by_name[keys[-1]]
        return P()

    return jax.tree_util.tree_map_with_path(spec, pure_params)


def check_divisible(cfg, dp: int, mode: str, weights: str = "bf16"):
    if mode == BY_EXPERT and cfg.n_routed_experts % dp:
        raise ValueError(f"{cfg.n_routed_experts} experts do not split over dp={dp}; use mode 'intermediate'")
    if mode == BY_INTERMEDIATE and cfg.moe_intermediate_size % dp:
        raise ValueError(f"moe_intermediate_size {cfg.moe_intermediate_size} does not split over dp={dp}")
    if mode == BY_INTERMEDIATE and packed_experts(weights) and cfg.moe_intermediate_size % (32 * dp):
        raise ValueError(f"FP4 experts split by intermediate dim need moe_intermediate_size "
                         f"{cfg.moe_intermediate_size} to be a multiple of 32 x dp={dp} (whole scale groups); "
                         "use mode 'expert'")


def place(x, sharding):
    """device_put onto a mesh. With several processes each places its own shards of its own
    (identical) copy: device_put would first check every array equal across processes, one
    all-gather of the whole array per parameter."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(pure_params: dict, mesh, mode: str = BY_EXPERT, expert_layout: str = NMAJOR):
    specs = param_specs(pure_params, mode, expert_layout)
    return jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), pure_params, specs)
