"""`--weights native`: a small official-layout checkpoint (FP4 experts, FP8 projections) made by
the test loads packed (uint8 codes + scales), and its logits match the same checkpoint
dequantised to dense weights, single device and DP 2 with TBO on and off; orbax keeps the packed
form; `auto` picks native for a quantised checkpoint. `--weights fp4-experts` (experts packed, FP8
projections decoded once at load) holds exactly native's decoded projections and gives native's
logits and greedy tokens (engine, dp 1 and 2).

Bound: the packed values decode exactly (e2m1 x 2**k and e4m3 x 2**k are exact in float32 and
bf16), so native and dequantised models multiply the same numbers; in float32 the logits differ
only by summation order: max |diff| <= 1e-4 x max |logit|. fp4-experts against native: the same
decoded float32 weights in the same matmuls (native decodes per call, then one einsum), so only
XLA's summation order could differ: max |diff| <= 1e-6 x max |logit| (0 on CPU today)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layout_check import assert_experts_transposed
from official_checkpoint import write_official_checkpoint

from atom_jax.config import tiny
from atom_jax.kernels.packed import fp8_dequantize
from atom_jax.loader import load_model, random_model, resolve_weights, save_orbax
from atom_jax.models import jit_forward
from atom_jax.models.packed_params import FP8_ATTENTION, FP8_SHARED, FUSED, SCALE, fused_offsets, fused_widths
from atom_jax.weights import CheckpointError
from atom_jax.sharding import StepOptions, make_dp_mesh, make_step, shard_tokens

BOUND = 1e-4
SAME_WEIGHTS_BOUND = 1e-6


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    model = random_model(tiny(), seed=int(np.random.SeedSequence().entropy % 2**31))
    return write_official_checkpoint(model, str(tmp_path_factory.mktemp("official")))


@pytest.fixture(scope="module")
def models(official):
    return load_model(official, weights="native"), load_model(official, weights="bf16")


@pytest.fixture(scope="module")
def fp4_experts(official):
    return load_model(official, weights="fp4-experts")


@pytest.fixture(scope="module")
def native_logits(models, ids_and_ref):
    return np.asarray(jit_forward(models[0])(ids_and_ref[0]))


@pytest.fixture(scope="module")
def ids_and_ref(models):
    """Token ids and the dequantised model's logits for them (one compile for every test)."""
    dense = models[1]
    ids = np.random.default_rng().integers(0, dense.cfg.vocab_size, size=(4, 21))
    return ids, np.asarray(jit_forward(dense)(ids))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_native_keeps_packed_and_matches_dequantised(models, official, ids_and_ref, native_logits):
    native, dense = models
    ffn, attn = native.layers[0].ffn, native.layers[0].attn
    assert ffn.w1.get_value().dtype == jnp.uint8 and ffn.w1_scale.get_value().dtype == jnp.uint8
    assert attn.wqkv.get_value().dtype == jnp.uint8 and attn.wqkv_scale.get_value().dtype == jnp.float32
    assert ffn.w1.get_value().shape == (dense.cfg.n_routed_experts, dense.cfg.hidden_size // 2,
                                        dense.cfg.moe_intermediate_size)
    assert resolve_weights(official) == "native"
    from atom_jax.engine import EngineConfig
    from atom_jax.sharding.memory import engine_memory_plan
    plan = engine_memory_plan(EngineConfig(model=official, dp=2), gpu_bytes=2**30)  # headers only
    assert plan.weights == "native" and "experts" in plan.format()
    assert _rel(native_logits, ids_and_ref[1]) < BOUND  # (the kernels: test_w4a16.py)


@pytest.fixture(scope="module")
def native_dp2(models, ids_and_ref):
    """(params, {tbo: logits}) of the native model's dp 2 step, TBO off and on (one program each,
    shared by the tests that compare with them)."""
    mesh = make_dp_mesh(2)
    step, params = make_step(models[0], mesh, StepOptions())
    ids = shard_tokens(ids_and_ref[0], mesh)
    return params, {tbo: np.asarray(step(params, ids, tbo=tbo)) for tbo in (False, True)}


@pytest.mark.parametrize("tbo", [False, True])
def test_native_dp2_matches_dequantised(native_dp2, ids_and_ref, tbo):
    params, logits = native_dp2
    assert params["layers"][0]["ffn"]["w1_scale"].sharding.spec[0] == "dp"  # scales follow their experts
    assert _rel(logits[tbo], ids_and_ref[1]) < BOUND


def test_orbax_round_trip_keeps_packed(models, fp4_experts, tmp_path):
    """Restored as saved; a native save restored as fp4-experts is what loading the safetensors
    checkpoint as fp4-experts gives (the same decode), and other formats are refused."""
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
    as_fp4_experts = load_model(out, weights="fp4-experts", host=True)
    assert as_fp4_experts.weights == "fp4-experts" and not hasattr(as_fp4_experts.layers[0].attn, "wq_a_scale")
    want = nnx.state(fp4_experts).to_pure_dict()
    got = nnx.state(as_fp4_experts).to_pure_dict()
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    with pytest.raises(CheckpointError, match="holds 'native' weights"):
        load_model(out, weights="bf16")


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


def _fp8_scale(native: dict, keys: tuple):
    """The float32 block scales of native's leaf at `keys` if it is an FP8 projection, else None."""
    parent = native
    for k in keys[:-1]:
        parent = parent[k]
    scale = parent.get(f"{keys[-1]}{SCALE}")
    return scale if scale is not None and scale.dtype == jnp.float32 else None


def _decoded_like_fp4_experts(codes, scale, leaf: str):
    """What fp4-experts holds for a native FP8 leaf: the decoded [out, in] weight in our layout."""
    w = np.asarray(fp8_dequantize(jnp.asarray(codes), jnp.asarray(scale), jnp.float32))
    if leaf in FUSED:  # each part's rows (padded to whole scale blocks), side by side as columns
        return np.concatenate([w[a:b].T for a, b in fused_offsets(fused_widths(tiny(), leaf), fp8=True)], axis=1)
    if leaf == "wo_a":  # [G*o_lora, in/G] -> [G, in/G, o_lora] (param_map's _wo_a)
        return w.reshape(tiny().o_groups, -1, w.shape[-1]).transpose(0, 2, 1)
    return w.T


def test_fp4_experts_holds_native_decoded_projections(models, fp4_experts, official, ids_and_ref, native_logits):
    """fp4-experts = native with every FP8 projection decoded once at load: its dense projections
    are exactly native's decoded codes x scales, every other leaf (FP4 experts included) is
    native's byte for byte, and the logits are native's (SAME_WEIGHTS_BOUND)."""
    from atom_jax.engine import EngineConfig
    from atom_jax.sharding.memory import engine_memory_plan

    native = nnx.state(models[0]).to_pure_dict()
    new = nnx.state(fp4_experts).to_pure_dict()
    new_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(new)}
    decoded = 0
    for path, a in jax.tree_util.tree_leaves_with_path(native):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        name = jax.tree_util.keystr(path)
        leaf = str(keys[-1])
        if leaf.endswith(SCALE) and _fp8_scale(native, keys[:-1] + (leaf.removesuffix(SCALE),)) is not None:
            assert name not in new_leaves, name  # no FP8 scales left
            continue
        b = new_leaves.pop(name)
        scale = _fp8_scale(native, keys)
        if scale is not None:
            assert a.dtype == jnp.uint8 and b.dtype == jnp.float32 and keys[-1] in FP8_ATTENTION + FP8_SHARED, name
            np.testing.assert_array_equal(np.asarray(b), _decoded_like_fp4_experts(a, scale, keys[-1]), err_msg=name)
            decoded += 1
        else:
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert not new_leaves and decoded == len(FP8_ATTENTION + FP8_SHARED) * tiny().num_layers
    assert fp4_experts.layers[0].ffn.w1.get_value().dtype == jnp.uint8  # experts stay packed
    assert resolve_weights(official, "fp4-experts") == "fp4-experts"
    plan = engine_memory_plan(EngineConfig(model=official, dp=2, weights="fp4-experts"), gpu_bytes=2**30)
    assert plan.weights == "fp4-experts"
    assert _rel(np.asarray(jit_forward(fp4_experts)(ids_and_ref[0])), native_logits) <= SAME_WEIGHTS_BOUND


@pytest.fixture(scope="module")
def native_greedy(models):
    """Prompts and 3 greedy tokens of the native model by full-sequence forwards."""
    prompts = np.random.default_rng().integers(0, models[0].cfg.vocab_size, size=(2, 17))
    ids, forward = prompts, jit_forward(models[0])
    for _ in range(3):
        ids = np.concatenate([ids, np.argmax(np.asarray(forward(ids))[:, -1], axis=-1)[:, None]], axis=1)
    return prompts, ids[:, 17:].tolist()


@pytest.mark.parametrize("dp", [1, 2])
def test_engine_fp4_experts_generates_as_native(official, native_greedy, dp):
    """`--weights fp4-experts` through the engine (cached step; dp 2 with TBO): native's greedy tokens."""
    from atom_jax.engine import Engine, EngineConfig
    from atom_jax.scheduler import SamplingParams

    small = dict(dp=dp, tbo=dp > 1, num_slots=4, num_pages=16, page_tokens=32, max_pages_per_seq=4,
                 max_tokens_per_step=32, chunk_size=16, buckets=(32,), compilation_cache_dir=None)
    prompts, want = native_greedy
    eng = Engine(EngineConfig(model=official, weights="fp4-experts", **small), tokenizer=None)
    assert eng.model.weights == "fp4-experts"
    got = [o.token_ids for o in eng.generate([list(map(int, p)) for p in prompts],
                                             SamplingParams(max_tokens=3, ignore_eos=True))]
    assert got == want


def test_fp4_experts_memory_plan_counts_projections_dense():
    """Per GPU: fp4-experts = native - the FP8 projections (1-byte codes + float32 128x128 block
    scales) + the same projections at 2 bytes per weight, counted here from the config's shapes;
    random weights built on the devices (dp 2) hold what the plan says."""
    from atom_jax.config import v4_flash
    from atom_jax.sharding import random_params_on_mesh
    from atom_jax.sharding.memory import measured_bytes_per_device, memory_plan

    def plan(cfg, weights):
        return memory_plan(cfg, 2, weights, gpu_bytes=2**40, dtype=jnp.bfloat16, page_tokens=128, num_slots=4,
                           reserve_bytes=0)

    cfg = v4_flash(num_layers=2)
    h, si = cfg.num_heads * cfg.head_dim, cfg.moe_intermediate_size * cfg.n_shared_experts
    go = cfg.o_groups * cfg.o_lora_rank
    d = cfg.hidden_size
    attention = [(cfg.q_lora_rank, d), (h, cfg.q_lora_rank), (cfg.head_dim, d), (go, h // cfg.o_groups), (d, go)]
    shared = [(si, d), (si, d), (d, si)]  # [out, in] as stored
    fp8 = sum(o * i + 4 * -(-o // 128) * -(-i // 128) for o, i in attention + shared) * cfg.num_layers
    dense = sum(2 * o * i for o, i in attention + shared) * cfg.num_layers
    native, new = plan(cfg, "native"), plan(cfg, "fp4-experts")
    assert new.weight_bytes_per_gpu == native.weight_bytes_per_gpu - fp8 + dense
    assert new.weight_bytes_by_part["experts"] == native.weight_bytes_by_part["experts"]

    small = tiny()
    _, params = random_params_on_mesh(small, make_dp_mesh(2), StepOptions(), jnp.bfloat16, weights="fp4-experts")
    assert params["layers"][0]["ffn"]["w1"].dtype == jnp.uint8
    assert params["layers"][0]["attn"]["wqkv"].dtype == jnp.bfloat16
    measured = measured_bytes_per_device(params)
    assert sorted(measured.values()) == [plan(small, "fp4-experts").weight_bytes_per_gpu] * 2


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


# ---- `--expert-layout kmajor`: FP4 expert codes [E, N, K/2] (the checkpoint's own orientation) ----
@pytest.fixture(scope="module")
def kmajor(official):
    return load_model(official, weights="native", expert_layout="kmajor")


def test_kmajor_loads_the_checkpoint_orientation_and_gives_nmajor_logits(models, kmajor, ids_and_ref, native_logits):
    """Loaded K-major: every expert stack's codes are nmajor's transposed (the checkpoint's [out,
    in/2] bytes), scales and every other leaf byte for byte nmajor's; the logits (jnp path) are
    nmajor's bit for bit."""
    from atom_jax.loader import with_expert_layout

    native = models[0]
    assert kmajor.expert_layout == "kmajor" and native.expert_layout == "nmajor"
    cfg = native.cfg
    assert kmajor.layers[0].ffn.w2.get_value().shape == (cfg.n_routed_experts, cfg.hidden_size,
                                                          cfg.moe_intermediate_size // 2)
    assert_experts_transposed(kmajor, native)
    np.testing.assert_array_equal(np.asarray(jit_forward(kmajor)(ids_and_ref[0])), native_logits)
    back = with_expert_layout(kmajor, "nmajor")  # and the conversion back: nmajor's codes
    np.testing.assert_array_equal(np.asarray(back.layers[1].ffn.w3.get_value()),
                                  np.asarray(native.layers[1].ffn.w3.get_value()))


def test_kmajor_dp2_tbo_matches_nmajor_bit_for_bit(native_dp2, kmajor, ids_and_ref):
    """dp 2 with TBO: experts sharded by expert (codes [E/2, N, K/2] per rank), the same logits as
    nmajor's bit for bit; sharded by intermediate dim the K-major codes' specs swap their axes."""
    from jax.sharding import PartitionSpec as P

    from atom_jax.sharding.placement import BY_INTERMEDIATE, param_specs
    mesh = make_dp_mesh(2)
    step, params = make_step(kmajor, mesh, StepOptions())
    assert params["layers"][0]["ffn"]["w1"].sharding.spec[0] == "dp"
    out = np.asarray(step(params, shard_tokens(ids_and_ref[0], mesh), tbo=True))
    np.testing.assert_array_equal(out, native_dp2[1][True])
    assert _rel(out, ids_and_ref[1]) < BOUND
    specs = param_specs(nnx.state(kmajor).to_pure_dict(), BY_INTERMEDIATE, "kmajor")["layers"][0]["ffn"]
    assert (specs["w1"], specs["w2"], specs["w1_scale"], specs["w2_scale"]) == (
        P(None, "dp", None), P(None, None, "dp"), P(None, None, "dp"), P(None, "dp", None))


def test_orbax_round_trip_keeps_kmajor(kmajor, models, tmp_path):
    """Saved K-major: restored as saved (codes byte for byte), or as nmajor on request (nmajor's
    codes)."""
    out = save_orbax(kmajor, str(tmp_path / "ckpt"))
    restored = load_model(out, host=True, expert_layout="kmajor")
    assert restored.expert_layout == "kmajor" and restored.weights == "native"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(kmajor).to_pure_dict()),
                            jax.tree.leaves(nnx.state(restored).to_pure_dict())):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    from atom_jax.loader import restore_orbax
    assert restore_orbax(out).expert_layout == "kmajor"  # as saved
    as_n = load_model(out, expert_layout="nmajor")
    assert as_n.expert_layout == "nmajor"
    np.testing.assert_array_equal(np.asarray(as_n.layers[0].ffn.w2.get_value()),
                                  np.asarray(models[0].layers[0].ffn.w2.get_value()))


def test_engine_kmajor_flag_generates_as_nmajor(official, native_greedy):
    """`EngineConfig.expert_layout` through the engine (cached step, dp 2, TBO): the model is
    loaded K-major and placed sharded, and its greedy tokens are nmajor's."""
    from atom_jax.engine import Engine, EngineConfig
    from atom_jax.scheduler import SamplingParams

    small = dict(dp=2, tbo=True, num_slots=4, num_pages=16, page_tokens=32, max_pages_per_seq=4,
                 max_tokens_per_step=32, chunk_size=16, buckets=(32,), compilation_cache_dir=None)
    prompts, want = native_greedy
    eng = Engine(EngineConfig(model=official, weights="native", expert_layout="kmajor", **small), tokenizer=None)
    assert eng.model.expert_layout == "kmajor"
    assert eng.runner.params["layers"][0]["ffn"]["w2"].shape == eng.model.layers[0].ffn.w2.get_value().shape
    got = [o.token_ids for o in eng.generate([list(map(int, p)) for p in prompts],
                                             SamplingParams(max_tokens=3, ignore_eos=True))]
    assert got == want


# ---- `--expert-layout kmajor` with bf16 experts: [E, N, K] (the checkpoint's [out, in]) ----
@pytest.fixture(scope="module")
def bf16_kmajor(official):
    return load_model(official, weights="bf16", expert_layout="kmajor")


def test_bf16_kmajor_loads_the_checkpoint_orientation_and_gives_nmajor_logits(models, bf16_kmajor, ids_and_ref):
    """Dense experts loaded K-major: every expert stack is nmajor's transposed (each expert's
    [out, in] as stored), every other leaf nmajor's; the logits (jnp path: the seam transposes
    `DenseKMajor` back) are nmajor's bit for bit; `with_expert_layout` converts both ways."""
    from atom_jax.kernels.packed import DenseKMajor
    from atom_jax.loader import with_expert_layout

    dense, km = models[1], bf16_kmajor
    cfg = dense.cfg
    assert km.expert_layout == "kmajor" and km.weights == "bf16" and dense.expert_layout == "nmajor"
    assert km.layers[0].ffn.w1.get_value().shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    assert all(isinstance(w, DenseKMajor) for w in km.layers[0].ffn.expert_stacks())
    assert_experts_transposed(km, dense)
    np.testing.assert_array_equal(np.asarray(jit_forward(km)(ids_and_ref[0])), ids_and_ref[1])
    back = with_expert_layout(km, "nmajor")
    assert back.expert_layout == "nmajor"
    np.testing.assert_array_equal(np.asarray(back.layers[1].ffn.w2.get_value()),
                                  np.asarray(dense.layers[1].ffn.w2.get_value()))
    there = with_expert_layout(dense, "kmajor")
    np.testing.assert_array_equal(np.asarray(there.layers[0].ffn.w3.get_value()),
                                  np.asarray(km.layers[0].ffn.w3.get_value()))


def test_bf16_kmajor_dp2_tbo_matches_nmajor_bit_for_bit(models, bf16_kmajor, ids_and_ref):
    """dp 2 with TBO: the K-major dense experts sharded by expert ([E/2, N, K] per rank), the same
    logits as the nmajor model's dp 2 TBO step bit for bit."""
    mesh = make_dp_mesh(2)
    ids = shard_tokens(ids_and_ref[0], mesh)
    out = {}
    for m in (models[1], bf16_kmajor):
        step, params = make_step(m, mesh, StepOptions())
        assert params["layers"][0]["ffn"]["w1"].sharding.spec[0] == "dp"
        out[m.expert_layout] = np.asarray(step(params, ids, tbo=True))
    np.testing.assert_array_equal(out["kmajor"], out["nmajor"])
    assert _rel(out["kmajor"], ids_and_ref[1]) < BOUND  # dp 2 vs one device: summation order only
