"""Issue 20: the TBO step's memory with packed FP4 experts.

- `grouped_gemm.decode_ahead`: experts decoded once ahead multiply exactly as the seam multiplies
  the packed ones (the jnp decode on CPU; the decode kernel + bf16 Pallas path forced on), and
  nothing is decoded where the seam would not decode (the W4A16 kernel; a backend that would not
  take the decoded path given bf16 weights).
- The TBO step decodes each layer's experts once for both chains (as many decodes as the step
  without TBO: a per-chain decode would double them), each after the layer's chain-A all-gather
  (an optimization barrier), so XLA cannot place several layers' decoded experts (3 x 2 GiB per
  layer at V4-Flash dp=2) before their layers.
- XLA's memory analysis of a TBO step whose decoded experts dominate: about one layer's decoded
  experts at a time (before: every layer's), at most TBO_TEMP_FACTOR x the step without TBO.
- Warm-up refuses a program that needs more temporary memory than the devices have free,
  naming the bucket, TBO and the flags to lower."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp4_dequant import random_packed

from atom_jax.config import tiny
from atom_jax.kernels import grouped_gemm, packed
from atom_jax.loader import random_model
from atom_jax.sharding import StepOptions, make_dp_mesh, make_step
from atom_jax.sharding.memory import ProgramMemoryError

# the TBO step's temporaries over the base step's, at most (CPU, V4-shaped native model)
TBO_TEMP_FACTOR = 1.5


def _seam_call(name, x, w, sizes, ids, gate, mean):
    swiglu = (lambda g, p: g * p, gate)
    return np.asarray(grouped_gemm.get(name)(x, w, sizes, mean, row_ids=ids, zero_tail=False, epilogue=swiglu),
                      np.float32)


@pytest.mark.parametrize("name, threshold, k_major", [("ragged_dot", None, False), ("auto", None, False),
                                                      ("pallas", 0, False), ("pallas", 0, True)])
def test_decode_ahead_multiplies_exactly_as_the_seam(name, threshold, k_major, monkeypatch):
    if threshold is not None:  # the decode kernel + bf16 Pallas path at these few rows
        monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", threshold)
    rng = np.random.default_rng()
    g, k, n, r, m = 4, 64, 32, 20, 48
    w = random_packed(rng, g, k, n, lowest=100)
    if k_major:
        w = packed.to_k_major(w)
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    gate = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    sizes = jnp.asarray([11, 0, 20, m - 31], jnp.int32)
    mean = m / g
    dense = grouped_gemm.decode_ahead(name, w, mean, jnp.bfloat16)
    assert dense is not None and dense.shape == (g, k, n) and dense.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_seam_call(name, x, dense, sizes, ids, gate, mean),
                                  _seam_call(name, x, w, sizes, ids, gate, mean))


def test_decode_ahead_declines_where_the_seam_decodes_in_the_kernel(monkeypatch):
    w = random_packed(np.random.default_rng(), 2, 64, 32)
    assert grouped_gemm.decode_ahead("pallas", w, 8.0, jnp.bfloat16) is None  # W4A16 kernel rows
    assert grouped_gemm.decode_ahead("ragged_dot", jnp.zeros((2, 64, 32)), 8.0, jnp.bfloat16) is None  # dense
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    assert grouped_gemm.decode_ahead("pallas", w, 8.0, jnp.bfloat16) is not None
    # mosaic given bf16 weights would run itself, not the seam's bf16 Pallas kernel
    assert grouped_gemm.decode_ahead("mosaic", w, 8.0, jnp.bfloat16) is None


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for j in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax.extend.core.Jaxpr):
                yield j


def _walk(jaxpr, decodes: list, pinned: list):
    """Count fp4_dequant kernels (not inside other kernels) and, per `decode_stacks` call, whether
    every array it decodes comes out of an optimization barrier."""
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            if "fp4_dequant" in str(e.params.get("name_and_src_info", e.params.get("name", ""))):
                decodes.append(e)
            continue
        if e.params.get("name") == "decode_stacks":  # its packed arrays that it reads (not the unused module state)
            inner = e.params["jaxpr"].jaxpr
            used = {v for q in inner.eqns for v in q.invars} | set(inner.outvars)
            packed = [o for o, i in zip(e.invars, inner.invars) if i in used and o.aval.dtype == jnp.uint8]
            pinned.append(bool(packed) and all(o in made_by and made_by[o].primitive.name == "optimization_barrier"
                                               for o in packed))
        for sub in _sub_jaxprs(e):
            _walk(sub, decodes, pinned)


@pytest.mark.parametrize("schedule", ["split", "fused"])
def test_tbo_decodes_each_layer_once_after_its_gather(schedule, monkeypatch):
    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)  # every GEMM takes the decode path
    model = random_model(tiny(), seed=0, weights="native")
    mesh = make_dp_mesh(2)
    step, params = make_step(model, mesh, StepOptions(moe_backend="pallas", tbo_schedule=schedule))
    ids = jnp.zeros((2, 16), jnp.int32)
    counts = {}
    for tbo in (False, True):
        decodes, pinned = [], []
        _walk(jax.make_jaxpr(lambda p, i, t=tbo: step(p, i, tbo=t))(params, ids).jaxpr, decodes, pinned)
        counts[tbo] = len(decodes)
        if tbo:
            assert pinned and all(pinned), "each layer's shared decode waits for its chain-A gather"
    layers = model.cfg.num_layers
    assert counts == {False: 3 * layers, True: 3 * layers}


@pytest.fixture(scope="module")
def engine():
    from atom_jax.engine import Engine, EngineConfig

    cfg = EngineConfig(dp=2, num_slots=4, num_pages=16, page_tokens=32, max_pages_per_seq=4,
                       max_tokens_per_step=32, chunk_size=32, buckets=(32,), compilation_cache_dir=None,
                       dtype="float32", weights="native")
    return Engine(cfg, model=random_model(tiny(), seed=0, weights="native"), tokenizer=None)


def test_tbo_step_temp_bytes_hold_one_layers_decoded_experts():
    """XLA's memory analysis of the TBO step of a 4-layer V4-shaped native model whose decoded
    experts dominate its temporaries (64 experts of 256 x 512, 32 tokens per rank), compiled on
    CPU with the optimization barriers kept through scheduling as XLA's GPU compiler keeps them
    (the CPU compiler drops them before scheduling unless told not to): about one layer's decoded
    experts live at a time (measured 58 MiB for 48 MiB of one layer's stacks; the TBO step before
    the fix: 202 MiB, every layer's at once), and at most TBO_TEMP_FACTOR x the step without TBO."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx

    from atom_jax.loader import abstract_model
    from atom_jax.sharding import DP
    from atom_jax.sharding.placement import param_specs

    layers, e, d, inter = 4, 64, 256, 512
    cfg = tiny().replace(num_layers=layers, attn_kinds=("sliding",) * layers, hash_layers=(True,) * layers,
                         hidden_size=d, n_routed_experts=e, moe_intermediate_size=inter, num_experts_per_tok=2)
    mesh = make_dp_mesh(2)
    model = abstract_model(cfg, jnp.float32, weights="native")
    step, _ = make_step(model, mesh, StepOptions(), place=False)
    pure = nnx.split(model)[1].to_pure_dict()
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                          pure, param_specs(pure))
    ids = jax.ShapeDtypeStruct((2, 32), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    keep_barriers = {"xla_disable_hlo_passes": "cse_barrier_expander"}
    temp = {tbo: step.lower(params, ids, tbo=tbo).compile(compiler_options=keep_barriers)
            .memory_analysis().temp_size_in_bytes for tbo in (False, True)}
    one_layer = 3 * (e // 2) * d * inter * 4  # a rank's w1, w3, w2 decoded (float32)
    assert temp[True] < 2 * one_layer, (temp, one_layer)
    assert temp[True] <= TBO_TEMP_FACTOR * temp[False], temp


def test_warmup_refuses_a_program_that_does_not_fit(engine, monkeypatch):
    from atom_jax.engine import runner as runner_mod

    runner = engine.runner
    runner.use_command_buffers(runner.command_buffers)  # drops the programs built ahead
    engine.config.tbo = True
    engine.reset_scheduler(engine.config.delayer)
    monkeypatch.setattr(runner_mod, "free_device_bytes", lambda devices: (1024, 2 ** 30))
    with pytest.raises(ProgramMemoryError) as err:
        engine.warmup()
    text = str(err.value)
    temp = runner.temp_bytes[(32, True)]
    assert temp > 1024
    for want in ("bucket 32", "TBO on", "1.00 KiB", "--max-tokens-per-step", "--num-slots", "--num-pages",
                 "--tbo off"):
        assert want in text, (want, text)
    # the refused program is not kept: a step of that shape (here: the dispatch's first use)
    # checks again instead of running a program the devices have no room for
    with pytest.raises(ProgramMemoryError):
        runner.program(32, True)
    # with the memory it needs free, the same warm-up runs
    monkeypatch.setattr(runner_mod, "free_device_bytes", lambda devices: (temp, 2 ** 30))
    engine.warmup()
    # the memory plan reserves the largest compiled step's temporaries instead of the fixed 8 GiB
    from atom_jax.sharding.memory import GiB, engine_memory_plan
    largest = max(runner.temp_bytes.values())
    plan = engine.memory_plan(gpu_bytes=16 * GiB)
    fixed = engine_memory_plan(engine.config, 16 * GiB, model=engine.model)
    assert plan.reserve_bytes == largest < 8 * GiB and fixed.reserve_bytes == 8 * GiB
    assert plan.kv_budget_bytes == fixed.kv_budget_bytes + 8 * GiB - largest


@pytest.mark.parametrize("tbo", [False, True])
def test_native_tbo_step_lowers_for_rocm_with_one_decode_per_expert_stack(tbo, monkeypatch):
    """The GPU path (lowered for ROCm, `auto`, K-major experts as a GPU holds them) with the decode
    path forced on: three fp4_dequant Triton kernels per layer with TBO as without (each layer's
    experts decoded once, shared by the chains' bf16 GEMMs), and each chain its own three GEMMs."""
    from test_rocm_lowering import DP_SIZE, _abstract, _export, _ops

    from atom_jax.loader import abstract_model
    from atom_jax.sharding import DP, param_specs
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx

    monkeypatch.setattr(grouped_gemm, "DEQUANT_MIN_ROWS_PER_GROUP", 0)
    cfg = tiny()
    model = abstract_model(cfg, jnp.bfloat16, weights="native", expert_layout="kmajor")
    mesh = make_dp_mesh(DP_SIZE)
    pure = nnx.split(model)[1].to_pure_dict()
    params = _abstract(pure, mesh, param_specs(pure, expert_layout="kmajor"))
    step, _ = make_step(model, mesh, StepOptions(moe_backend="auto"), place=False)
    ids = jax.ShapeDtypeStruct((DP_SIZE * 2, 8), jnp.int32, sharding=NamedSharding(mesh, P(DP)))
    triton = [text for kind, text in _ops(_export(step, params, ids, tbo=tbo)) if kind == "custom_call:triton"]
    names = collections.Counter(m.group(1) for t in triton if (m := re.search(r'name = "([^"]*)"', t)))
    chains = 2 if tbo else 1
    # one decode per expert stack and layer (grouped_gemm.KMAJOR_DECODE_TO_NK picks which kernel), not 3 per chain
    decode, other = ("fp4_dequant_kmajor", "fp4_dequant") if grouped_gemm.KMAJOR_DECODE_TO_NK else \
        ("fp4_dequant", "fp4_dequant_kmajor")
    assert names[decode] == 3 * cfg.num_layers and not names[other]
    assert names["grouped_gemm"] == 3 * chains * cfg.num_layers  # the bf16 kernel: w1, w3, w2 per chain
