"""Checkpoint loading end to end: DeepSeek's official FP8/FP4 layout against the reference,
orbax round trip, random init, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from atom_jax.config import ConfigError, tiny, v4_flash
from atom_jax.loader import load_model, random_model, save_orbax
from atom_jax.models import jit_forward
from atom_jax.weights import quant
from atom_jax.weights.reader import CheckpointError, iter_checkpoint
from hf_reference import hf_logits, make_hf_model
from layout_check import assert_experts_transposed
from official_checkpoint import write_safetensors_with_dtypes

FP8_LEAVES = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|shared_experts\.w[123]\.weight$")
FP4_LEAVES = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = make_hf_model("a", 11)
    hf.save_pretrained(path)
    return hf, str(path)


def _official_copy(src: str, dst: str):
    """Quantise a transformers-saved tiny model into DeepSeek's official layout (2 shards + index).
    Also write the dequantised float weights back in the transformers layout, for the reference."""
    os.makedirs(dst, exist_ok=True)
    original = load_file(os.path.join(src, "model.safetensors"))
    canon = {t.source_name: t.name for t in iter_checkpoint(src)}
    shards, dequantised = [{}, {}], {}
    for i, (orig_name, w) in enumerate(sorted(original.items())):
        name = canon[orig_name]
        shard = shards[i % 2]
        if FP4_LEAVES.search(name):
            q, s = quant.quantize_fp4(w)
            shard[name], shard[name[: -len("weight")] + "scale"] = q, s.view(np.uint8)
            w = quant.dequantize_fp4(q, s)
        elif FP8_LEAVES.search(name):
            q, s = quant.quantize_fp8(w)
            shard[name], shard[name[: -len("weight")] + "scale"] = q.view(np.uint8), s.view(np.uint8)
            w = quant.dequantize_fp8(q, s)
        else:
            shard[name] = w
        dequantised[orig_name] = np.ascontiguousarray(w.astype(np.float32))
    return shards, dequantised


def test_official_fp8_fp4_layout_matches_reference(saved_hf, tmp_path):
    from transformers import DeepseekV4ForCausalLM

    hf, src = saved_hf
    shards, dequantised = _official_copy(src, str(tmp_path / "official"))
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        fp8 = {k for k in shard if k.endswith(".weight") and FP8_LEAVES.search(k)}
        e8m0 = {k for k in shard if k.endswith(".scale")}
        write_safetensors_with_dtypes(str(tmp_path / "official" / fname), shard, fp8, e8m0)
        weight_map.update({k: fname for k in shard})
    (tmp_path / "official" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "official" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    # the reference runs on exactly the dequantised weights
    (tmp_path / "deq").mkdir()
    save_file(dequantised, str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    ref_model = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "deq")).eval()

    ids = np.random.default_rng(3).integers(0, 256, size=(2, 96))
    ref = hf_logits(ref_model, ids)
    # auto = native (FP4 experts, FP8 projections); fp4-experts: the projections decoded at load
    for weights in ("auto", "fp4-experts"):
        model = load_model(str(tmp_path / "official"), weights=weights)
        assert model.weights == ("native" if weights == "auto" else weights)
        ours = np.asarray(jit_forward(model)(ids))
        assert np.max(np.abs(ours - ref)) < 1e-4, weights
    # and the quantisation really changed the weights (the test would be vacuous otherwise)
    assert np.max(np.abs(ref - hf_logits(hf, ids))) > 1e-4


def test_orbax_round_trip(saved_hf, tmp_path):
    _, src = saved_hf
    model = load_model(src)
    out = save_orbax(model, str(tmp_path / "ckpt"))
    restored = load_model(out)
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 40))
    np.testing.assert_array_equal(np.asarray(jit_forward(model)(ids)), np.asarray(jit_forward(restored)(ids)))


def test_hf_checkpoint_loads_bf16_experts_kmajor_and_orbax_keeps_it(saved_hf, tmp_path):
    """`expert_layout="kmajor"` with bf16 experts from an HF checkpoint: each routed expert's
    [out, in] kept as stored ([E, N, K]: nmajor's stacks transposed), every other leaf nmajor's;
    saved with orbax it restores K-major (as saved), or nmajor on request."""
    from flax import nnx

    _, src = saved_hf
    nmajor, kmajor = load_model(src, host=True), load_model(src, host=True, expert_layout="kmajor")
    assert (nmajor.weights, nmajor.expert_layout, kmajor.expert_layout) == ("bf16", "nmajor", "kmajor")
    assert_experts_transposed(kmajor, nmajor)
    cfg = kmajor.cfg  # random init builds them K-major directly
    assert random_model(cfg, expert_layout="kmajor").layers[0].ffn.w2.get_value().shape == (
        cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    out = save_orbax(kmajor, str(tmp_path / "ckpt"))
    from atom_jax.loader import restore_orbax

    restored = restore_orbax(out, host=True)  # as saved
    assert restored.expert_layout == "kmajor"
    assert load_model(out, host=True, expert_layout="kmajor").expert_layout == "kmajor"
    for a, b in zip(*(jax.tree.leaves(nnx.state(m).to_pure_dict()) for m in (kmajor, restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    as_n = load_model(out, host=True, expert_layout="nmajor")
    assert as_n.expert_layout == "nmajor"
    np.testing.assert_array_equal(np.asarray(as_n.layers[0].ffn.w1.get_value()),
                                  np.asarray(nmajor.layers[0].ffn.w1.get_value()))


@pytest.mark.parametrize("weights", ["bf16", "native"])
def test_orbax_saved_before_fused_projections(tmp_path, weights):
    """An orbax checkpoint in the older layout (each compressor's wkv / wgate, the indexer's
    weights_proj, the attention's wq_a / wkv, the shared expert's w1 / w3 as their own leaves;
    FP8 unpadded) restores into the fused parameters, on device and on host, to the same logits."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from atom_jax.models.compressor import projection_columns
    from atom_jax.models.layers import split_columns
    from atom_jax.models.packed_params import FUSED, SCALE, fused_offsets, fused_widths

    model = random_model(tiny(), seed=5, weights=weights)
    out = save_orbax(model, str(tmp_path / "ckpt"))
    pure = nnx.state(model).to_pure_dict()
    for i, kind in enumerate(model.cfg.attn_kinds):
        attn, ffn = pure["layers"][i]["attn"], pure["layers"][i]["ffn"]
        if "wcomp" in attn:
            parts = split_columns(np.asarray(attn.pop("wcomp")), projection_columns(model.cfg, kind))
            attn["compressor"].update(wkv=parts[0], wgate=parts[1])
            if "indexer" in attn:
                attn["indexer"]["compressor"].update(wkv=parts[2], wgate=parts[3])
                attn["indexer"]["weights_proj"] = parts[4]
        for node, name in ((attn, "wqkv"), (ffn, "s_w13")):
            w, widths = np.asarray(node.pop(name)), fused_widths(model.cfg, name)
            if weights == "native":  # [out, in] rows, each part padded to whole 128-row scale blocks
                scale = np.asarray(node.pop(name + SCALE))
                for part, (a, b) in zip(FUSED[name], fused_offsets(widths, fp8=True)):
                    node[part], node[part + SCALE] = w[a:b], scale[a // 128: -(-b // 128)]
            else:
                node.update(zip(FUSED[name], split_columns(w, widths)))
    legacy = jax.tree.map(lambda a: {"value": a}, pure)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out, "orbax"), legacy, force=True)
    ids = np.random.default_rng(2).integers(0, 256, size=(1, 40))
    want = np.asarray(jit_forward(model)(ids))
    for host in (False, True):
        restored = load_model(out, host=host)
        np.testing.assert_array_equal(np.asarray(jit_forward(restored)(ids)), want)


def test_orbax_saved_on_a_device_this_process_lacks(tmp_path):
    """The embedded default model is saved from a CPU; a GPU process has no cpu:0 and orbax would
    place each leaf as saved. Saved from this process's last device, the checkpoint (current and
    older fused layouts) restores in a process with one device to the same logits."""
    import subprocess
    import sys

    import orbax.checkpoint as ocp
    from flax import nnx

    last = jax.devices()[-1]
    assert last.id > 0, "conftest simulates 8 CPU devices"
    model = random_model(tiny(), seed=7)
    nnx.update(model, jax.device_put(nnx.state(model), last))
    out = save_orbax(model, str(tmp_path / "ckpt"))
    legacy = str(tmp_path / "legacy")  # a tree the fused layout cannot take: the unfused path reads it
    save_orbax(model, legacy)
    pure = nnx.state(model).to_pure_dict()
    attn = pure["layers"][0]["attn"]
    attn["wq_a"], attn["wkv"] = np.split(np.asarray(attn.pop("wqkv")), [model.cfg.q_lora_rank], axis=-1)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(legacy, "orbax"), jax.tree.map(lambda a: {"value": jax.device_put(a, last)}, pure),
                  force=True)
    ids = np.random.default_rng(3).integers(0, 256, size=(1, 24))
    np.save(tmp_path / "ids.npy", ids)
    code = ("import sys, numpy as np, jax\n"
            "from atom_jax.loader import load_model\nfrom atom_jax.models import jit_forward\n"
            "assert len(jax.devices()) == 1\nids = np.load(sys.argv[1])\n"
            "for i, path in enumerate(sys.argv[2:]):\n"
            "    np.save(f'{sys.argv[1]}.{i}.npy', np.asarray(jit_forward(load_model(path))(ids)))\n")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    # this process's XLA flags but one device: the same compile options, so the same logits bit for bit
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ids.npy"), out, legacy], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    want = np.asarray(jit_forward(model)(ids))
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"ids.npy.{i}.npy"), want)


def test_random_init_any_config():
    model = random_model(tiny(), seed=3)
    logits = jit_forward(model)(np.arange(50)[None] % 500)
    assert logits.shape == (1, 50, 512) and bool(jnp.all(jnp.isfinite(logits)))
    # V4-Flash shapes trace without allocating (one layer of each kind would be ~GBs)
    flash = v4_flash(num_layers=3)
    out = jax.eval_shape(lambda ids: random_model(flash, dtype=jnp.bfloat16)(ids),
                         jax.ShapeDtypeStruct((1, 256), jnp.int32))
    assert out.shape == (1, 256, flash.vocab_size)


# ---- bad input: one clear error naming the tensor and the file ------------------------------

def _copy_with(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return os.path.join(dst, "model.safetensors")


def test_missing_tensor_is_named(saved_hf, tmp_path):
    _, src = saved_hf
    _copy_with(src, tmp_path, lambda t: t.pop("model.layers.2.attn.compressor.ape"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.compressor\.ape"):
        load_model(str(tmp_path))


def test_wrong_shape_names_tensor_and_file(saved_hf, tmp_path):
    _, src = saved_hf

    def edit(t):
        t["model.layers.1.attn.wq_a.weight"] = np.zeros((31, 64), np.float32)

    f = _copy_with(src, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_a\.weight") as e:
        load_model(str(tmp_path))
    assert f in str(e.value) or os.path.basename(f) in str(e.value)


def test_unexpected_tensor_is_named(saved_hf, tmp_path):
    _, src = saved_hf
    _copy_with(src, tmp_path, lambda t: t.__setitem__("model.layers.0.attn.compressor.ape", np.zeros((4, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.compressor\.ape"):
        load_model(str(tmp_path))


def test_truncated_file_is_named(saved_hf, tmp_path):
    _, src = saved_hf
    f = _copy_with(src, tmp_path, lambda t: None)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        load_model(str(tmp_path))
    assert re.search(r"'[\w.]+'", str(e.value)), f"no tensor named in: {e.value}"


def test_unknown_dtype_is_named(saved_hf, tmp_path):
    _, src = saved_hf
    f = _copy_with(src, tmp_path, lambda t: None)
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    header["norm.weight" if "norm.weight" in header else "model.norm.weight"]["dtype"] = "Q3_K"
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    open(f, "wb").write(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"norm\.weight.*|Q3_K"):
        load_model(str(tmp_path))


def test_wrong_model_type(saved_hf, tmp_path):
    _, src = saved_hf
    _copy_with(src, tmp_path, lambda t: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("key,value,words", [("hidden_size", -4, "hidden_size"),
                                             ("num_hidden_layers", "4", "num_hidden_layers"),
                                             ("compress_rates", 5, "wrong type")])
def test_bad_config_values_are_config_errors(saved_hf, tmp_path, key, value, words):
    _, src = saved_hf
    _copy_with(src, tmp_path, lambda t: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=words):
        load_model(str(tmp_path))


def test_integer_dtype_for_a_float_parameter_is_refused(saved_hf, tmp_path):
    _, src = saved_hf
    name = "head.weight"

    def edit(t):
        t[name] = np.ones(t[name].shape, np.int64)

    _copy_with(src, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"head\.weight.*int64"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_index_entries_outside_the_model_dir_are_refused(saved_hf, tmp_path, where):
    _, src = saved_hf
    model_dir = tmp_path / "model"
    f = _copy_with(src, model_dir, lambda t: None)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(open(f, "rb").read())  # a real file: refused for where it is, not for missing
    names = list(load_file(f))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = "../outside.safetensors" if where == "dotdot" else str(outside)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_model(str(model_dir))
