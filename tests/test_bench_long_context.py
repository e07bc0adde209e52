"""`python -m atom_jax.bench long-context --tiny`: the real Engine on the tiny model, one prompt,
prefill and decode timed beside the FLOP and byte floors the bench computes (the GPU run of
issue 26 uses the same code at V4-Flash dims)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from atom_jax.bench.__main__ import main


def test_long_context_tiny_reports_times_beside_their_floors(tmp_path, monkeypatch):
    from atom_jax.bench import long_context

    real = long_context._run_prompt

    def run_prompt(engine, vocab, length, decode_tokens, rng):  # the 400-token prompt fails (as a GPU OOM)
        if length == 400:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (faked)")
        return real(engine, vocab, length, decode_tokens, rng)

    monkeypatch.setattr(long_context, "_run_prompt", run_prompt)
    built = []  # the engines' configs: --moe-backend must reach them
    real_engine = long_context._engine
    monkeypatch.setattr(long_context, "_engine",
                        lambda *a, **k: built.append((e := real_engine(*a, **k))[0].config) or e)
    out = tmp_path / "lc.json"
    assert main(["long-context", "--tiny", "--prompts", "300,400", "--decode-tokens", "3", "--json", str(out),
                 "--trace", str(tmp_path / "trace"), "--trace-steps", "1", "--moe-backend", "dense"]) == 0
    res = json.loads(out.read_text())
    row, failed = res["results"]
    assert [c.moe_backend for c in built] == ["dense"] and row["moe"] == "dense"
    assert failed["prompt"] == 400 and "RESOURCE_EXHAUSTED" in failed["error"]
    assert (row["backend"], row["prompt"], row["cache_len"], row["chunk"]) == ("jnp", 300, 4096, 256)
    assert row["prefill_s"] > 0 and row["decode_ms"] > 0
    assert row["prefill_tok_s"] == pytest.approx(300 / row["prefill_s"], rel=0.02)
    # each "of floor" is the floor's time over the measured one
    assert row["prefill_of_floor"] == pytest.approx(row["prefill_floor_s"] / row["prefill_s"], rel=0.05, abs=1e-3)
    assert row["decode_of_floor"] == pytest.approx(row["decode_floor_ms"] / row["decode_ms"], rel=0.05, abs=1e-3)
    assert res["ceilings"]["copy_GBps"] > 0 and res["ceilings"]["matmul_TFLOPs"] > 0
    # the prefill's detail: add_request, then each step until the first token (300 tokens in 256-token
    # chunks: 2, plus the step that reads the last one's token with the overlap schedule), which together
    # are the prefill's time; the host clock counted those steps
    det = row["prefill_detail"]
    assert len(det["steps_ms"]) == det["host"]["steps"] in (2, 3) and det["add_ms"] >= 0
    assert det["add_ms"] + sum(det["steps_ms"]) == pytest.approx(1e3 * row["prefill_s"], rel=0.01, abs=0.1)
    # --trace: one prefill chunk profiled after the timed run: its kernels by layer and category
    # (the CPU client may run a small step inline on the calling thread, recorded as host events,
    # so a CPU trace can hold no device events; a GPU one always does); the longest prompt that
    # ran, not the failed one
    (tr,) = res["traces"]
    assert tr["steps"] == 1 and tr["prompt"] == 300 and tr["trace"].startswith(str(tmp_path))
    assert sum(tr["by_layer_category_ms"].values()) == pytest.approx(tr["sum_ms"], rel=0.01, abs=0.01)
    assert tr["busy_ms"] <= tr["sum_ms"] + 0.01
    if tr["top_kernels"]:
        assert tr["busy_ms"] > 0 and any("layer" in k["op_name"] for k in tr["top_kernels"])


def test_baseline_cache_that_fits_no_prompt_is_an_error():
    """A --baseline-cache-len no prompt fits (prompt + decoded tokens + 1) stops before any work
    instead of silently running no baseline row."""
    with pytest.raises(SystemExit, match="baseline-cache-len 1000"):
        main(["long-context", "--tiny", "--prompts", "1000", "--decode-tokens", "4", "--baseline-cache-len", "1000"])


def test_attention_tiles_specs():
    from atom_jax.bench.long_context import attention_tiles
    from atom_jax.kernels.sparse_attention import TILES, AttentionTiles

    assert attention_tiles("default") is None
    assert attention_tiles("64x32x8") == AttentionTiles(64, 32, 8, TILES.num_stages)
    assert attention_tiles("16x64x4x3") == AttentionTiles(16, 64, 4, 3)
    assert attention_tiles("16x64x4x3x0") == AttentionTiles(16, 64, 4, 3, prefetch=False)
    assert attention_tiles("64x32x8x2x0x2") == AttentionTiles(64, 32, 8, 2, prefetch=False, dv_split=2)
    assert attention_tiles("64x128x8x1x0x1x1") == AttentionTiles(64, 128, 8, 1, prefetch=False, transpose=True)
    assert attention_tiles("64x128x8x1x0x1x1x4x1") == AttentionTiles(64, 128, 8, 1, prefetch=False, transpose=True,
                                                                    dim_chunks=4, prefetch_rows=True)
    assert attention_tiles("64x128x8x1x0x1x1x4x1x1") == AttentionTiles(
        64, 128, 8, 1, prefetch=False, transpose=True, dim_chunks=4, prefetch_rows=True, one_window_load=True)
    plain = dataclasses.replace(TILES, window_fast=0, exp2=False, lazy_sum=False)
    assert attention_tiles("64x128x8x1x0x1x1x4x1x0x1") == plain
    assert attention_tiles("64x128x8x1x0x1x1x4x1x0x1x1") == dataclasses.replace(plain, window_fast=1)
    assert attention_tiles("64x128x8x1x0x1x1x4x1x0x1x2x1x1") == dataclasses.replace(TILES, window_fast=2)
    assert attention_tiles("64x128x8x1x0x1x1x4x1x0x1x1x1") == dataclasses.replace(TILES, lazy_sum=False)
    assert attention_tiles("64x128x8x1x0x1x1x4x1x0x1x1x1x1") == TILES
    for bad in ("64x32", "64x0x8", "axbxc", "64x32x8x2x1x0", "64x32x8x2x1x2x2", "64x32x8x2x1x2x1x0",
                "64x32x8x2x1x2x1x1x2", "64x32x8x2x1x2x1x1x1x2", "64x32x8x2x1x2x1x1x1x1x2",
                "64x32x8x2x1x2x1x1x1x1x1x1x2", "64x32x8x2x1x2x1x1x1x1x1x1x1x2",
                "64x32x8x2x1x2x1x1x1x1x1x1x1x1x1", "64x32x8x2x1x2x1x1x1x1x1x3"):
        with pytest.raises(SystemExit):
            attention_tiles(bad)


def test_expert_layouts_run_in_one_process_on_the_same_weights(tmp_path, monkeypatch):
    """`--expert-layout nmajor,kmajor`: one engine per layout, in order, each given the same
    random model with its routed experts in that layout ([E, K, N], then the same values [E, N,
    K]); the rows say which. (The engine and its timing are stand-ins: the first test runs them.)"""
    import numpy as np

    from atom_jax.bench import long_context

    seen = []

    def engine(model, *a, **kw):
        w1 = np.asarray(model.layers[0].ffn.w1.get_value())
        seen.append((model.expert_layout, w1 if model.expert_layout == "nmajor" else np.swapaxes(w1, -1, -2)))
        return object(), 0.0

    monkeypatch.setattr(long_context, "_engine", engine)
    monkeypatch.setattr(long_context, "_run_prompt", lambda *a: (0.5, 0.01))
    monkeypatch.setattr(long_context, "device_ceilings", lambda: {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0})
    out = tmp_path / "lc.json"
    assert main(["long-context", "--tiny", "--prompts", "300", "--decode-tokens", "3", "--json", str(out),
                 "--expert-layout", "nmajor,kmajor"]) == 0
    assert [layout for layout, _ in seen] == ["nmajor", "kmajor"]
    np.testing.assert_array_equal(seen[0][1], seen[1][1])
    rows = json.loads(out.read_text())["results"]
    assert [(r["experts"], r["prompt"]) for r in rows] == [("nmajor", 300), ("kmajor", 300)]
    with pytest.raises(SystemExit, match="expert-layout"):
        main(["long-context", "--tiny", "--expert-layout", "nmajor,sideways"])


def test_long_context_moe_backends_are_one_engine_each(tmp_path, monkeypatch):
    """--moe-backend takes a comma list (duplicates dropped): one engine per backend, each row
    naming its own (engines that fail to build, to keep this fast: their rows say so); an unknown
    name exits with a message before any work (the ceilings, the model)."""
    from atom_jax.bench import long_context

    asked = []

    def engine(*a, **k):
        asked.append(a[-1])
        raise RuntimeError("no engine here")

    monkeypatch.setattr(long_context, "_engine", engine)
    out = tmp_path / "lc.json"
    assert main(["long-context", "--tiny", "--prompts", "64", "--decode-tokens", "1", "--json", str(out),
                 "--moe-backend", "dense,ragged_dot,dense"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert asked == ["dense", "ragged_dot"]
    assert [(r["moe"], r["error"]) for r in rows] == [(m, "RuntimeError: no engine here") for m in asked]
    monkeypatch.setattr(long_context, "device_ceilings", lambda: pytest.fail("measured before the check"))
    with pytest.raises(SystemExit, match="'nope'"):
        main(["long-context", "--tiny", "--prompts", "64", "--moe-backend", "dense,nope"])
    assert len(asked) == 2
