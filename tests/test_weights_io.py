"""Checkpoint reading: safetensors parsing, FP8/FP4 dequantisation, the three name layouts.

Fresh random data every run; the seed is printed (shown by pytest on failure)."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from atom_jax.weights import names as nm
from atom_jax.weights import quant
from atom_jax.weights.errors import CheckpointError
from atom_jax.weights.official_config import official_to_hf_dict
from atom_jax.weights.reader import checkpoint_layout, checkpoint_names, iter_checkpoint, plan_checkpoint
from atom_jax.weights.safetensors_io import SafetensorsFile, list_safetensors


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**63))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


# ---- independent float64 reference decoders (bit fields, no ml_dtypes) ----------------------

def ref_e4m3(codes) -> np.ndarray:
    b = np.asarray(codes).view(np.uint8).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, (m / 8.0) * 2.0**-6, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    return np.where((e == 15) & (m == 7), np.nan, sign * mag)


def ref_e8m0(codes) -> np.ndarray:
    b = np.asarray(codes).view(np.uint8).astype(np.float64)
    return np.where(b == 255, np.nan, np.exp2(b - 127.0))


def ref_e2m1(code) -> np.ndarray:
    c = np.asarray(code).astype(np.int64)
    e, m = (c >> 1) & 3, c & 1
    mag = np.where(e == 0, 0.5 * m, np.exp2(e - 1.0) * (1.0 + 0.5 * m))
    return np.where(c & 8, -mag, mag)


def ref_scale(scale) -> np.ndarray:
    scale = np.asarray(scale)
    if scale.dtype == np.dtype(ml_dtypes.float8_e8m0fnu):
        return ref_e8m0(scale)
    return scale.astype(np.float64)


def ref_fp8_dequant(weight, scale) -> np.ndarray:
    w = ref_e4m3(weight)
    s = ref_scale(scale)
    i = np.arange(w.shape[0])[:, None] // 128
    j = np.arange(w.shape[1])[None, :] // 128
    return w * s[i, j]


def ref_fp4_dequant(packed, scale) -> np.ndarray:
    b = np.asarray(packed).view(np.uint8).astype(np.int64)
    out = np.empty((b.shape[0], b.shape[1] * 2))
    out[:, 0::2] = ref_e2m1(b & 0xF)  # low nibble: even input column
    out[:, 1::2] = ref_e2m1(b >> 4)
    j = np.arange(out.shape[1])[None, :] // 32
    return out * ref_scale(scale)[np.arange(out.shape[0])[:, None], j]


# ---- a tiny safetensors writer of our own (for malformed files) ------------------------------

def write_raw_safetensors(path, entries: dict, data: bytes, pad_to: int = 8):
    blob = json.dumps(entries).encode()
    blob += b" " * (-len(blob) % pad_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def write_np_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]):
    entries, chunks, off = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        entries[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    write_raw_safetensors(path, entries, b"".join(chunks))


# ---- safetensors parsing -----------------------------------------------------------------------

def test_every_dtype_reads_back_bit_exact(tmp_path, rng):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g)  # noqa: E731
    e4m3 = u8(7, 9)
    e4m3[(e4m3 & 0x7F) == 0x7F] = 0  # no NaN codes
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(4, 6, generator=g),
        "f16": torch.randn(5, dtype=torch.float16, generator=g),
        "bf16": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        "e4m3": e4m3.view(torch.float8_e4m3fn),
        "e5m2": (torch.randn(6, generator=g) * 4).to(torch.float8_e5m2),
        "e8m0": torch.randint(100, 160, (3, 4), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu),
        "fp4x2": u8(2, 4).view(torch.float4_e2m1fn_x2),
        "i64": torch.randint(-2**40, 2**40, (4,), dtype=torch.int64, generator=g),
        "i32": torch.randint(-2**30, 2**30, (2, 2), dtype=torch.int32, generator=g),
        "i16": torch.randint(-2**14, 2**14, (3,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 128, (5, 3), dtype=torch.int8, generator=g),
        "u8": u8(4),
        "bool": torch.randint(0, 2, (7,), generator=g).bool(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    f = SafetensorsFile(path)
    assert set(f.names()) == set(tensors)
    assert f.metadata == {"format": "pt", "note": "x"}
    want_dtype = {"f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2",
                  "e8m0": "F8_E8M0", "fp4x2": "F4", "i64": "I64", "i32": "I32", "i16": "I16", "i8": "I8",
                  "u8": "U8", "bool": "BOOL", "scalar": "F32", "empty": "F32"}
    for name, t in tensors.items():
        arr = f.get(name)
        assert f.info(name).dtype == want_dtype[name], name
        assert arr.shape == tuple(t.shape), name  # F4: packed bytes, as torch holds them
        if t.numel():
            assert arr.tobytes() == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
        assert not arr.flags.writeable or arr.size == 0
    assert f.info("fp4x2").shape == (2, 8)  # the header counts fp4 elements
    np.testing.assert_array_equal(f.get("e4m3").astype(np.float64), ref_e4m3(e4m3.numpy()))
    np.testing.assert_array_equal(f.get("e8m0").astype(np.float64), ref_e8m0(tensors["e8m0"].view(torch.uint8).numpy()))
    np.testing.assert_array_equal(f.get("bf16").astype(np.float32), tensors["bf16"].float().numpy())
    np.testing.assert_array_equal(f.get("bool"), tensors["bool"].numpy())


def test_header_errors_name_file_and_tensor(tmp_path):
    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}
    data = bytes(24)

    p = tmp_path / "trunc.safetensors"
    write_raw_safetensors(p, good, data)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 3)
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors.*'b'.*truncated") as e:
        SafetensorsFile(p)
    assert e.value.tensor == "b" and e.value.file == str(p)

    p = tmp_path / "dtype.safetensors"
    write_raw_safetensors(p, {**good, "c": {"dtype": "Q4_K", "shape": [1], "data_offsets": [24, 24]}}, data)
    with pytest.raises(CheckpointError, match=r"dtype\.safetensors.*'c'.*unknown dtype 'Q4_K'"):
        SafetensorsFile(p)

    p = tmp_path / "span.safetensors"
    write_raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, data)
    with pytest.raises(CheckpointError, match=r"span\.safetensors.*'a'.*byte span 16"):
        SafetensorsFile(p)

    p = tmp_path / "json.safetensors"
    blob = b'{"a": {"dtype": "F32",'
    p.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(CheckpointError, match=r"json\.safetensors.*not valid JSON"):
        SafetensorsFile(p)

    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=r"short\.safetensors.*truncated"):
        SafetensorsFile(p)

    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(p)


def test_directory_listing(tmp_path):
    for n in ("b.safetensors", "a.safetensors"):
        write_np_safetensors(tmp_path / n, {n: ("F32", np.zeros(2, np.float32))})
    files, wmap = list_safetensors(tmp_path)
    assert [os.path.basename(f) for f in files] == ["a.safetensors", "b.safetensors"] and wmap is None
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.safetensors": "a.safetensors", "ghost": "missing.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json.*'ghost'.*missing\.safetensors.*does not exist"):
        list_safetensors(tmp_path)
    with pytest.raises(CheckpointError, match=r"index\.json.*'ghost'"):
        list(iter_checkpoint(tmp_path))


# ---- dequantisation against the float64 reference ------------------------------------------

def _e4m3_codes(rng, shape):
    c = rng.integers(0, 256, shape, dtype=np.uint8)
    c[(c & 0x7F) == 0x7F] = 0x38  # replace NaN codes by 1.0
    return c.view(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(130, 200), (256, 128), (1, 1), (129, 383)])
@pytest.mark.parametrize("scale_kind", ["ue8m0", "float32"])
def test_fp8_dequant_matches_reference(rng, shape, scale_kind):
    w = _e4m3_codes(rng, shape)
    sshape = (-(-shape[0] // 128), -(-shape[1] // 128))
    if scale_kind == "ue8m0":
        scale = rng.integers(110, 140, sshape, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    else:
        scale = rng.uniform(1e-4, 1e-1, sshape).astype(np.float32)
    ref = ref_fp8_dequant(w, scale)
    got = quant.dequantize_fp8(w, scale)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    got_bf16 = quant.dequantize_fp8(w, scale, ml_dtypes.bfloat16)
    assert got_bf16.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_allclose(got_bf16.astype(np.float64), ref, rtol=2**-8 * 1.001, atol=0)
    with pytest.raises(ValueError, match="scale shape"):
        quant.dequantize_fp8(w, np.ones((sshape[0] + 1, sshape[1]), np.float32))


@pytest.mark.parametrize("shape", [(5, 64), (33, 96), (1, 2), (7, 40)])
@pytest.mark.parametrize("int_dtype", [np.int8, np.uint8])
def test_fp4_dequant_matches_reference(rng, shape, int_dtype):
    packed = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8).view(int_dtype)
    scale = rng.integers(115, 135, (shape[0], -(-shape[1] // 32)), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    ref = ref_fp4_dequant(packed, scale)
    got = quant.dequantize_fp4(packed, scale)
    assert got.shape == shape
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    # the e2m1 table, one byte at a time: low nibble first
    one = quant.dequantize_fp4(np.array([[0x7A]], np.uint8), np.array([[127]], np.uint8).view(ml_dtypes.float8_e8m0fnu))
    np.testing.assert_array_equal(one, [[-1.0, 6.0]])
    with pytest.raises(ValueError, match="scale shape"):
        quant.dequantize_fp4(packed, np.zeros((shape[0], 99), np.uint8).view(ml_dtypes.float8_e8m0fnu))


def _fp8_bound(w, scale):
    s = ref_scale(scale)
    se = s[np.arange(w.shape[0])[:, None] // 128, np.arange(w.shape[1])[None, :] // 128]
    # 3 mantissa bits; subnormal step 2**-9; (1 + 1e-6) for the float32 division before rounding
    return (2.0**-4 * np.abs(w) + se * 2.0**-10) * (1 + 1e-6)


def _fp4_bound(w, scale):
    se = ref_scale(scale)[np.arange(w.shape[0])[:, None], np.arange(w.shape[1])[None, :] // 32]
    # grid {0,.5,1,1.5,2,3,4,6}: half-steps <= max(.25|x|, .25)
    return (0.25 * np.abs(w) + 0.25 * se) * (1 + 1e-6)


@pytest.mark.parametrize("scale_format", ["ue8m0", "float32"])
def test_quantize_fp8_roundtrip(rng, scale_format):
    w = (rng.standard_normal((200, 300)) * rng.uniform(0.01, 3)).astype(np.float32)
    w[:128, :128] *= 50  # blocks of very different magnitude
    q, s = quant.quantize_fp8(w, scale_format)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (2, 3)
    deq = ref_fp8_dequant(q, s)
    assert np.all(np.abs(deq - w) <= _fp8_bound(w, s))
    np.testing.assert_array_equal(quant.dequantize_fp8(q, s), deq.astype(np.float32))


def test_quantize_fp4_roundtrip(rng):
    w = (rng.standard_normal((40, 128)) * rng.uniform(0.01, 3)).astype(np.float32)
    w[:, 32:64] *= 1e-3
    packed, s = quant.quantize_fp4(w)
    assert packed.dtype == np.int8 and packed.shape == (40, 64) and s.shape == (40, 4)
    deq = ref_fp4_dequant(packed, s)
    assert np.all(np.abs(deq - w) <= _fp4_bound(w, s))
    np.testing.assert_array_equal(quant.dequantize_fp4(packed, s), deq.astype(np.float32))


# ---- the three layouts ---------------------------------------------------------------------

TINY = dict(vocab_size=96, hidden_size=160, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            head_dim=32, q_lora_rank=144, num_experts_per_tok=2, n_routed_experts=4, compress_ratios=[0, 4, 128, 4],
            num_hash_layers=2, sliding_window=16, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
            index_topk=4, qk_rope_head_dim=8)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """(layout-A dir, layout-B dir, state_dict as numpy) of one randomly initialised tiny model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    seed = int(np.random.SeedSequence().entropy % (2**31))
    print(f"model seed {seed}")
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV4Config(**TINY)
    model = transformers.DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():  # fresh values everywhere, not just the initialiser's ones/zeros
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
            elif name.endswith("tid2eid"):
                t.copy_(torch.randint(0, TINY["n_routed_experts"], t.shape))
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "a")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    os.makedirs(root / "b")
    save_file(sd, str(root / "b" / "model.safetensors"))
    return root / "a", root / "b", {k: v.numpy() for k, v in sd.items()}


def _read(path, **kw):
    out = {}
    for t in iter_checkpoint(path, **kw):
        assert t.name not in out
        out[t.name] = t
    return out


def test_hf_layouts_normalise_to_the_same_canonical_tensors(hf_checkpoints):
    a_dir, b_dir, sd = hf_checkpoints
    assert checkpoint_layout(a_dir) == nm.LAYOUT_HF_SAVED
    assert checkpoint_layout(b_dir) == nm.LAYOUT_HF_MODULES
    a, b = _read(a_dir), _read(b_dir)
    assert set(a) == set(b)
    assert all(nm.is_canonical(n) for n in a)
    for n in a:
        assert a[n].array.dtype == b[n].array.dtype, n
        np.testing.assert_array_equal(a[n].array, b[n].array, err_msg=n)
    # names the release uses, including transformers' `attn.norm` -> official `attn.kv_norm`
    for n in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight",
              "layers.0.ffn.gate.tid2eid", "layers.3.ffn.gate.bias", "layers.1.attn.indexer.compressor.ape",
              "layers.2.attn.compressor.wkv.weight", "layers.3.ffn.experts.3.w2.weight"):
        assert n in a, n
    assert "layers.2.attn.indexer.wq_b.weight" not in a  # HCA layers have no indexer
    assert a["layers.0.attn.kv_norm.weight"].source_name == "model.layers.0.attn.norm.weight"
    # stacked experts: w1 = gate rows, w3 = up rows, w2 = down; views of the stacked tensor
    inter = TINY["moe_intermediate_size"]
    gu, down = sd["model.layers.3.mlp.experts.gate_up_proj"], sd["model.layers.3.mlp.experts.down_proj"]
    for e in range(TINY["n_routed_experts"]):
        np.testing.assert_array_equal(b[f"layers.3.ffn.experts.{e}.w1.weight"].array, gu[e, :inter])
        np.testing.assert_array_equal(b[f"layers.3.ffn.experts.{e}.w3.weight"].array, gu[e, inter:])
        np.testing.assert_array_equal(b[f"layers.3.ffn.experts.{e}.w2.weight"].array, down[e])
    assert b["layers.0.ffn.gate.tid2eid"].array.dtype == np.int64
    # header-only listing agrees with the data
    for d, got in ((a_dir, a), (b_dir, b)):
        listing = checkpoint_names(d)
        assert listing == {n: (t.array.shape, t.source) for n, t in got.items()}
    bf = _read(a_dir, dtype=ml_dtypes.bfloat16)
    assert bf["layers.1.attn.wq_b.weight"].array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert bf["layers.1.ffn.gate.tid2eid"].array.dtype == np.int64


# which canonical leaves DeepSeek ships as FP8 (the rest of the linears are BF16)
_FP8_LEAVES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
               "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight",
               "ffn.shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
_F32_MARKERS = ("hc_", "attn_sink", ".ape", "gate.bias")


def _official_encoding(name: str, w: np.ndarray, rng) -> dict[str, tuple[str, np.ndarray]]:
    """How the release stores one canonical tensor: {stored name: (dtype, array)}."""
    stem = name[: -len(".weight")]
    if nm._EXPERT_LEAF.search(name):
        packed, s = quant.quantize_fp4(w)
        return {name: ("I8", packed), stem + ".scale": ("F8_E8M0", s)}
    if name.endswith(_FP8_LEAVES):
        if name.endswith(("wo_b.weight", "shared_experts.w2.weight")):  # V3 spelling: float32 `weight_scale_inv`
            q, s = quant.quantize_fp8(w, "float32")
            return {name: ("F8_E4M3", q), name + "_scale_inv": ("F32", s)}
        q, s = quant.quantize_fp8(w, "ue8m0")
        return {name: ("F8_E4M3", q), stem + ".scale": ("F8_E8M0", s)}
    if w.dtype.kind == "i":
        return {name: ("I64", w.astype(np.int64))}
    if any(m in name for m in _F32_MARKERS):
        return {name: ("F32", w.astype(np.float32))}
    return {name: ("BF16", w.astype(ml_dtypes.bfloat16))}


def _mtp_tensors(rng, dim, hc=4):
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    return {"mtp.0.e_proj.weight": f(dim, dim), "mtp.0.h_proj.weight": f(dim, dim), "mtp.0.enorm.weight": f(dim),
            "mtp.0.hnorm.weight": f(dim), "mtp.0.norm.weight": f(dim), "mtp.0.hc_head_fn": f(hc, hc * dim),
            "mtp.0.hc_head_base": f(hc), "mtp.0.hc_head_scale": f(1), "mtp.0.attn.attn_sink": f(4),
            "mtp.0.ffn.experts.0.w2.weight": f(dim, 32)}


def write_official(dir_path, canonical: dict[str, np.ndarray], rng, shards: int = 2, drop=(), edit=None):
    """Quantise canonical float tensors the way DeepSeek ships them, sharded with an index."""
    stored: dict[str, tuple[str, np.ndarray]] = {}
    for name, w in canonical.items():
        stored.update(_official_encoding(name, w, rng))
    for d in drop:
        del stored[d]
    if edit:
        edit(stored)
    os.makedirs(dir_path, exist_ok=True)
    names = list(stored)
    rng.shuffle(names)  # scales may land in another shard than their weight
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n] for n in names[k::shards]}
        write_np_safetensors(os.path.join(dir_path, fname), part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(dir_path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return stored


def test_official_layout_dequantises_within_quantisation_error(hf_checkpoints, tmp_path, rng):
    a_dir, _, _ = hf_checkpoints
    ref = {n: t.array for n, t in _read(a_dir).items()}
    canonical = {**ref, **_mtp_tensors(rng, TINY["hidden_size"])}
    stored = write_official(tmp_path / "c", canonical, rng)
    assert checkpoint_layout(tmp_path / "c") == nm.LAYOUT_OFFICIAL
    got = _read(tmp_path / "c")
    assert set(got) == set(canonical)
    n_fp8 = n_fp4 = 0
    for name, w in canonical.items():
        g = got[name].array.astype(np.float64)
        assert g.shape == w.shape, name
        stem = name[: -len(".weight")]
        if stored[name][0] == "I8":
            n_fp4 += 1
            assert np.all(np.abs(g - w) <= _fp4_bound(w, stored[stem + ".scale"][1])), name
        elif stored[name][0] == "F8_E4M3":
            n_fp8 += 1
            s = stored.get(stem + ".scale", stored.get(name + "_scale_inv"))[1]
            assert np.all(np.abs(g - w) <= _fp8_bound(w, s)), name
        elif stored[name][0] == "BF16":
            np.testing.assert_allclose(g, w, rtol=2**-8, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)
    assert n_fp8 > 10 and n_fp4 == 3 * TINY["n_routed_experts"] * TINY["num_hidden_layers"] + 1
    assert not any(n.endswith((".scale", "_scale_inv")) for n in got)  # companions consumed
    # MTP is skippable; the header-only listing reports dequantised shapes
    no_mtp = checkpoint_names(tmp_path / "c", ignore=[r"^mtp\."])
    assert set(no_mtp) == set(ref)
    assert no_mtp["layers.1.ffn.experts.0.w1.weight"][0] == (TINY["moe_intermediate_size"], TINY["hidden_size"])
    bf = _read(tmp_path / "c", dtype=ml_dtypes.bfloat16, ignore=r"^mtp\.")
    assert set(bf) == set(ref)
    np.testing.assert_allclose(bf["layers.2.attn.wo_b.weight"].array.astype(np.float64),
                               got["layers.2.attn.wo_b.weight"].array, rtol=2**-8)


def _small_official(rng):
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    return {"embed.weight": f(16, 64), "layers.0.attn.wq_a.weight": f(32, 64),
            "layers.0.ffn.experts.0.w1.weight": f(32, 64), "layers.0.ffn.gate.tid2eid": np.zeros((16, 2), np.int64)}


def test_missing_scale_companion_raises(tmp_path, rng):
    write_official(tmp_path / "fp8", _small_official(rng), rng, shards=1, drop=["layers.0.attn.wq_a.scale"])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors.*'layers\.0\.attn\.wq_a\.weight'"
                                              r".*scale companion 'layers\.0\.attn\.wq_a\.scale' is missing"):
        list(iter_checkpoint(tmp_path / "fp8"))
    write_official(tmp_path / "fp4", _small_official(rng), rng, drop=["layers.0.ffn.experts.0.w1.scale"])
    with pytest.raises(CheckpointError, match=r"'layers\.0\.ffn\.experts\.0\.w1\.weight'.*is missing"):
        checkpoint_names(tmp_path / "fp4")


def test_wrong_scale_shape_raises(tmp_path, rng):
    def bad(stored):
        stored["layers.0.ffn.experts.0.w1.scale"] = ("F8_E8M0", np.zeros((32, 3), np.uint8))
    write_official(tmp_path / "c", _small_official(rng), rng, edit=bad)
    with pytest.raises(CheckpointError, match=r"'layers\.0\.ffn\.experts\.0\.w1\.scale'.*shape \[32, 3\], "
                                              r"expected \[32, 2\]"):
        plan_checkpoint(tmp_path / "c")


def test_unknown_names_raise_unless_ignored(tmp_path, rng):
    def extra(stored):
        stored["vision.proj.weight"] = ("F32", np.zeros((2, 2), np.float32))
    write_official(tmp_path / "c", _small_official(rng), rng, edit=extra)
    with pytest.raises(CheckpointError, match=r"\.safetensors: tensor 'vision\.proj\.weight': name maps to no"):
        list(iter_checkpoint(tmp_path / "c"))
    got = _read(tmp_path / "c", ignore=[r"^vision\."])
    assert set(got) == set(_small_official(rng))
    assert got["layers.0.ffn.gate.tid2eid"].array.dtype == np.int64


def test_name_mapping_table():
    assert nm.map_name("model.layers.5.self_attn.compressor.indexer.scorer.weights_proj.weight")[0].canonical == \
        "layers.5.attn.indexer.weights_proj.weight"
    assert nm.map_name("model.layers.5.attn_hc.scale")[0].canonical == "layers.5.hc_attn_scale"
    assert nm.map_name("model.hc_head.hc_base")[0].canonical == "hc_head_base"
    assert nm.map_name("lm_head.weight")[0].canonical == "head.weight"
    assert nm.map_name("mtp.0.hc_head_scale")[0].canonical == "mtp.0.hc_head_scale"
    assert nm.map_name("layers.0.e_proj.weight") is None  # MTP-only leaf outside an MTP block
    assert nm.map_name("model.layers.1.mlp.experts.2.up_proj.weight")[0].canonical == \
        "layers.1.ffn.experts.2.w3.weight"
    assert nm.companion_stem("layers.0.attn.wq_a.weight_scale_inv") == ("layers.0.attn.wq_a.weight", "weight_scale_inv")
    assert nm.detect_layout(["embed.weight", "layers.0.attn.wkv.weight"]) == nm.LAYOUT_OFFICIAL


# ---- official inference/config.json --------------------------------------------------------

V4_FLASH_OFFICIAL = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512,
    "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "scale_dtype": "fp8",
    "max_batch_size": 4, "max_seq_len": 4096,
}


def test_official_to_hf_dict_v4_flash():
    hf = official_to_hf_dict(V4_FLASH_OFFICIAL)
    assert len(V4_FLASH_OFFICIAL["compress_ratios"]) == 44  # 43 blocks + the MTP block
    expect = {"model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
              "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
              "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "num_hash_layers": 3,
              "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
              "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
              "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "swiglu_limit": 10.0, "hc_mult": 4,
              "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000,
              "compress_rope_theta": 160000, "num_nextn_predict_layers": 1, "norm_topk_prob": True,
              "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
              "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                                  "beta_fast": 32, "beta_slow": 1},
              "max_position_embeddings": 1048576}
    for k, v in expect.items():
        assert hf[k] == v, k
    assert hf["compress_ratios"] == V4_FLASH_OFFICIAL["compress_ratios"]
    assert hf["quantization_config"]["scale_fmt"] == "ue8m0"
    assert "max_batch_size" not in hf and "dim" not in hf
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV4Config(**hf)
    assert cfg.layer_types[:4] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                   "heavily_compressed_attention"]
    assert len(cfg.layer_types) == 43 and cfg.layer_types[-1] == "compressed_sparse_attention"
    assert cfg.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"]
    assert cfg.qk_rope_head_dim == 64
    assert cfg.rope_parameters["compress"]["rope_type"] == "yarn"
    assert cfg.rope_parameters["compress"]["factor"] == 16.0
    assert cfg.rope_parameters["main"]["rope_theta"] == 10000


def test_official_to_hf_dict_v4_pro_and_errors():
    pro = {**V4_FLASH_OFFICIAL, "dim": 7168, "n_layers": 61, "n_heads": 128, "q_lora_rank": 1536, "o_groups": 16,
           "moe_inter_dim": 3072, "n_routed_experts": 384, "route_scale": 2.5, "index_topk": 1024,
           "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0]}
    hf = official_to_hf_dict(pro)
    assert hf["compress_rates"] == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert hf["hidden_size"] == 7168 and hf["index_topk"] == 1024 and hf["routed_scaling_factor"] == 2.5
    no_yarn = official_to_hf_dict({**V4_FLASH_OFFICIAL, "rope_factor": 1, "original_seq_len": 0})
    assert "rope_parameters" not in no_yarn
    with pytest.raises(ValueError, match="missing"):
        official_to_hf_dict({"dim": 8})
    with pytest.raises(ValueError, match="at least n_layers"):
        official_to_hf_dict({**V4_FLASH_OFFICIAL, "compress_ratios": [0, 4]})


def test_f4_dtype_experts_and_duplicate_names(tmp_path, rng):
    w = (rng.standard_normal((8, 64)) * 0.1).astype(np.float32)
    packed, s = quant.quantize_fp4(w, packed_dtype=np.uint8)
    entries = {"layers.0.ffn.experts.1.w2.weight": ("F4", packed), "layers.0.ffn.experts.1.w2.scale": ("F8_E8M0", s)}
    path = tmp_path / "f4" / "model.safetensors"
    os.makedirs(path.parent)
    write_np_safetensors(path, entries)
    # our writer records the packed shape; F4 headers count fp4 elements, so patch it to [8, 64]
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["layers.0.ffn.experts.1.w2.weight"]["shape"] = [8, 64]
    write_raw_safetensors(path, header, raw[8 + n:])
    (t,) = list(iter_checkpoint(path.parent))
    assert t.name == "layers.0.ffn.experts.1.w2.weight" and t.array.shape == (8, 64)
    np.testing.assert_array_equal(t.array, ref_fp4_dequant(packed, s).astype(np.float32))

    dup = tmp_path / "dup"
    os.makedirs(dup)
    write_np_safetensors(dup / "model.safetensors", {"layers.0.attn.kv_norm.weight": ("F32", np.ones(4, np.float32)),
                                                     "model.layers.0.attn.norm.weight": ("F32", np.ones(4, np.float32))})
    with pytest.raises(CheckpointError, match=r"canonical 'layers\.0\.attn\.kv_norm\.weight', already given"):
        checkpoint_names(dup)
