"""`--weights native`: a small official-layout checkpoint (FP4 experts, FP8 projections) made by
the test loads packed (uint8 codes + scales), and its logits match the same checkpoint
dequantised to dense weights, single device and DP 2 with TBO on and off; orbax keeps the packed
form; `auto` picks native for a quantised checkpoint.

Bound: the packed values decode exactly (e2m1 x 2**k and e4m3 x 2**k are exact in float32 and
bf16), so native and dequantised models multiply the same numbers; in float32 the logits differ
only by summation order: max |diff| <= 1e-4 x max |logit|."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from official_checkpoint import write_official_checkpoint

from atom_jax.config import tiny
from atom_jax.loader import load_model, random_model, resolve_weights, save_orbax
from atom_jax.models import jit_forward
from atom_jax.sharding import StepOptions, make_dp_mesh, make_step, shard_tokens

BOUND = 1e-4


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    model = random_model(tiny(), seed=int(np.random.SeedSequence().entropy % 2**31))
    return write_official_checkpoint(model, str(tmp_path_factory.mktemp("official")))


@pytest.fixture(scope="module")
def models(official):
    return load_model(official, weights="native"), load_model(official, weights="bf16")


@pytest.fixture(scope="module")
def ids_and_ref(models):
    """Token ids and the dequantised model's logits for them (one compile for every test)."""
    dense = models[1]
    ids = np.random.default_rng().integers(0, dense.cfg.vocab_size, size=(4, 21))
    return ids, np.asarray(jit_forward(dense)(ids))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_native_keeps_packed_and_matches_dequantised(models, official, ids_and_ref):
    native, dense = models
    ffn, attn = native.layers[0].ffn, native.layers[0].attn
    assert ffn.w1.get_value().dtype == jnp.uint8 and ffn.w1_scale.get_value().dtype == jnp.uint8
    assert attn.wq_a.get_value().dtype == jnp.uint8 and attn.wq_a_scale.get_value().dtype == jnp.float32
    assert ffn.w1.get_value().shape == (dense.cfg.n_routed_experts, dense.cfg.hidden_size // 2,
                                        dense.cfg.moe_intermediate_size)
    assert resolve_weights(official) == "native"
    from atom_jax.engine import EngineConfig
    from atom_jax.sharding.memory import engine_memory_plan
    plan = engine_memory_plan(EngineConfig(model=official, dp=2), gpu_bytes=2**30)  # headers only
    assert plan.weights == "native" and "experts" in plan.format()
    ids, ref = ids_and_ref
    assert _rel(np.asarray(jit_forward(native)(ids)), ref) < BOUND  # (the kernels: test_w4a16.py)


@pytest.mark.parametrize("tbo", [False, True])
def test_native_dp2_matches_dequantised(models, ids_and_ref, tbo):
    native, _ = models
    mesh = make_dp_mesh(2)
    ids, ref = ids_and_ref
    step, params = make_step(native, mesh, StepOptions())
    assert params["layers"][0]["ffn"]["w1_scale"].sharding.spec[0] == "dp"  # scales follow their experts
    assert _rel(np.asarray(step(params, shard_tokens(ids, mesh), tbo=tbo)), ref) < BOUND


def test_orbax_round_trip_keeps_packed(models, tmp_path):
    native, _ = models
    out = save_orbax(native, str(tmp_path / "ckpt"))
    restored = load_model(out, host=True)  # auto: as saved; host: numpy, for sharded placement
    assert restored.weights == "native"
    assert isinstance(restored.layers[0].ffn.w1.get_value(), np.ndarray)
    assert restored.layers[0].ffn.w2.get_value().dtype == jnp.uint8
    saved = nnx.state(native).to_pure_dict()
    back = nnx.state(restored).to_pure_dict()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(back)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_engine_native_flag_generates_as_dequantised(official, models):
    """`EngineConfig.weights` through the engine (cached step, DP 2, TBO): greedy tokens of the
    packed model equal greedy decoding of the dequantised model by full-sequence forwards."""
    from atom_jax.engine import Engine, EngineConfig
    from atom_jax.scheduler import SamplingParams

    small = dict(dp=2, tbo=True, num_slots=4, num_pages=16, page_tokens=32, max_pages_per_seq=4,
                 max_tokens_per_step=32, chunk_size=16, buckets=(32,), compilation_cache_dir=None)
    rng = np.random.default_rng()
    prompts = rng.integers(0, models[1].cfg.vocab_size, size=(2, 17))
    eng = Engine(EngineConfig(model=official, weights="auto", **small), tokenizer=None)
    assert eng.model.weights == "native"
    native = [o.token_ids for o in eng.generate([list(map(int, p)) for p in prompts],
                                                SamplingParams(max_tokens=3, ignore_eos=True))]
    ids, forward = prompts, jit_forward(models[1])
    for _ in range(3):
        ids = np.concatenate([ids, np.argmax(np.asarray(forward(ids))[:, -1], axis=-1)[:, None]], axis=1)
    assert native == ids[:, 17:].tolist()


@pytest.mark.parametrize("weights", ["native", "bf16"])
def test_memory_plan_matches_placed_bytes(weights):
    """The plan's weight bytes per GPU are what the placement puts on each device."""
    from atom_jax.sharding.memory import measured_bytes_per_device, memory_plan
    from atom_jax.sharding.placement import shard_params

    cfg = tiny()
    model = random_model(cfg, dtype=jnp.bfloat16, weights=weights)
    params = shard_params(nnx.state(model).to_pure_dict(), make_dp_mesh(2))
    plan = memory_plan(cfg, 2, weights, gpu_bytes=2**30, dtype=jnp.bfloat16, page_tokens=32, num_slots=4,
                       reserve_bytes=0)
    measured = measured_bytes_per_device(params)
    assert sorted(measured.values()) == [plan.weight_bytes_per_gpu] * 2
    assert plan.kv_bytes_per_token > 0 and plan.kv_tokens_per_gpu > 0
    if weights == "native":  # FP4 experts: 0.53 bytes per weight instead of 2
        dense = memory_plan(cfg, 2, "bf16", gpu_bytes=2**30, dtype=jnp.bfloat16, page_tokens=32, num_slots=4,
                            reserve_bytes=0)
        ratio = plan.weight_bytes_by_part["experts"] / dense.weight_bytes_by_part["experts"]
        assert abs(ratio - (0.5 + 1 / 32) / 2) < 1e-9
