"""ROCm, checked on every CI run (no AMD GPU needed): the engine's cached step and the
full-sequence DP step lower for the `rocm` platform with `jax.export` (cross-platform
lowering), TBO on and off, with the backends `auto` picks on ROCm: our Triton-backend Pallas
grouped GEMM (and, in the cached step, the sparse attention and indexer kernels), as Triton
custom calls, not interpret mode (the cached step with the prefix cache's page state, as
the engine builds it, and the prefix cache's slot restore too). This catches
lowering errors; it does not compile for an AMD chip (docs/design.md, "ROCm")."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.config import tiny
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels.platform import is_cpu, lowering_for, target_platform
from atom_jax.loader import abstract_model
from atom_jax.sharding import DP, StepOptions, make_dp_mesh, make_step, param_specs
from atom_jax.sharding.cached_step import make_cached_step, make_restore
from atom_jax.trace import op_counts

TRITON = "__gpu$xla.gpu.triton"
DP_SIZE = 2


def _export(fn, *args, **kwargs):
    with lowering_for("rocm"):
        return jax.export.export(fn, platforms=("rocm",),
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args, **kwargs)


def _abstract(tree, mesh, specs):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
                        tree, specs)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny()
    model = abstract_model(cfg, jnp.bfloat16)
    mesh = make_dp_mesh(DP_SIZE)
    pure = nnx.split(model)[1].to_pure_dict()
    params = _abstract(pure, mesh, param_specs(pure))
    return cfg, model, mesh, params


def _ops(exported):
    """Every op of the exported program as run: a function shared by the layers of one kind
    (models/trace_once.py) counted at each call site. -> [(kind, op text: custom calls only)]."""
    module = op_counts.parse_stablehlo(exported.mlir_module())
    return [(kind, str(op) if kind.startswith("custom_call") else "") for _, op, kind in op_counts.stablehlo_ops(module)]


def _check(exported, cfg, tbo, attention_kernels=False):
    ops = _ops(exported)
    assert exported.platforms == ("rocm",)
    triton = [text for kind, text in ops if kind == "custom_call:triton"]
    assert triton and all(TRITON in t for t in triton), "auto on ROCm must run the Triton Pallas kernel, not its interpreter"
    # one all-gather (tokens + routing) and one reduce-scatter per chain and MoE layer
    chains = 2 if tbo else 1
    assert sum(kind == "all_gather" for kind, _ in ops) == chains * cfg.num_layers
    assert sum(kind == "reduce_scatter" for kind, _ in ops) == chains * cfg.num_layers
    gemms = 3 * chains * cfg.num_layers  # w1, w3, w2 per chain and layer
    sinkhorns = 2 * chains * cfg.num_layers  # the mHC comb of attention and MoE, per chain and layer
    assert sum("hc_sinkhorn" in t for t in triton) == sinkhorns
    kernels = gemms + sinkhorns
    assert len(triton) > kernels if attention_kernels else len(triton) == kernels
    return triton


def test_auto_picks_the_triton_kernel_for_rocm():
    assert is_cpu() and target_platform() == "cpu"
    with lowering_for("rocm"):
        assert not is_cpu() and target_platform() == "rocm"
        for rows_per_group in (1.0, 64.0, 4096.0):  # tokamax is NVIDIA-only: never on ROCm
            assert grouped_gemm.choose(rows_per_group, has_tokamax=True) == "pallas"
    assert target_platform() == "cpu"


@pytest.mark.parametrize("tbo", [False, True])
def test_cached_step_lowers_for_rocm(setup, tbo):
    cfg, model, mesh, params = setup
    # with the prefix cache's page state, as the engine builds it by default
    layout = CacheLayout(num_slots=2, num_pages=8, page_tokens=128, max_pages_per_seq=2, state_pages=4)
    step, _ = make_cached_step(model, mesh, layout, StepOptions(moe_backend="auto"))
    dp_spec = lambda tree: jax.tree.map(lambda _: P(DP), tree)  # noqa: E731
    one = jax.eval_shape(lambda: init_cache(cfg, layout, jnp.bfloat16))
    cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct((DP_SIZE,) + a.shape, a.dtype), one)
    cache = _abstract(cache, mesh, dp_spec(cache))
    b = pack_chunks([(0, 0, np.arange(5, dtype=np.int32), True), (1, 3, np.arange(2, dtype=np.int32), True)],
                    16, layout.num_slots, split=tbo)
    batch = {k: jax.ShapeDtypeStruct((DP_SIZE,) + v.shape, v.dtype) for k, v in b.arrays().items()}
    batch = _abstract(batch, mesh, dp_spec(batch))
    pt = jax.ShapeDtypeStruct((DP_SIZE, layout.num_slots, layout.max_pages_per_seq), jnp.int32,
                              sharding=NamedSharding(mesh, P(DP)))
    _check(_export(step, params, cache, batch, pt, tbo=tbo), cfg, tbo, attention_kernels=True)


def test_prefix_cache_restore_lowers_for_rocm(setup):
    cfg, _, mesh, _ = setup
    layout = CacheLayout(num_slots=2, num_pages=8, page_tokens=128, max_pages_per_seq=2, state_pages=4)
    one = jax.eval_shape(lambda: init_cache(cfg, layout, jnp.bfloat16))
    cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct((DP_SIZE,) + a.shape, a.dtype,
                                                        sharding=NamedSharding(mesh, P(DP))), one)
    rows = jax.ShapeDtypeStruct((DP_SIZE, layout.num_slots), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    entries = jax.ShapeDtypeStruct((DP_SIZE, layout.num_slots, 1), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    exported = _export(make_restore(mesh, layout), cache, rows, rows, entries)
    assert exported.platforms == ("rocm",) and "scatter" in exported.mlir_module()


@pytest.mark.parametrize("tbo", [False, True])
def test_dp_step_lowers_for_rocm(setup, tbo):
    cfg, model, mesh, params = setup
    step, _ = make_step(model, mesh, StepOptions(moe_backend="auto"), place=False)
    ids = jax.ShapeDtypeStruct((DP_SIZE * 2, 8), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    # traced for this CPU process first: lowering_for must not reuse that trace
    plain = jax.export.export(step, platforms=("rocm",))(params, ids, tbo=tbo)
    assert TRITON not in plain.mlir_module()
    _check(_export(step, params, ids, tbo=tbo), cfg, tbo)


@pytest.mark.parametrize("expert_layout", ["nmajor", "kmajor"])
def test_dp_step_with_native_weights_lowers_for_rocm(expert_layout):
    """Packed FP4 experts / FP8 projections (`weights="native"`), codes in either layout (kmajor:
    `--expert-layout auto` on a GPU, ROCm included): the W4A16 Triton kernel in place of the bf16
    one, one per expert projection."""
    cfg = tiny()
    model = abstract_model(cfg, jnp.bfloat16, weights="native", expert_layout=expert_layout)
    mesh = make_dp_mesh(DP_SIZE)
    pure = nnx.split(model)[1].to_pure_dict()
    params = _abstract(pure, mesh, param_specs(pure, expert_layout=expert_layout))
    step, _ = make_step(model, mesh, StepOptions(moe_backend="auto"), place=False)
    ids = jax.ShapeDtypeStruct((DP_SIZE * 2, 8), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    triton = _check(_export(step, params, ids, tbo=False), cfg, False)
    assert sum("w4a16_grouped_gemm" in t for t in triton) == 3 * cfg.num_layers
