"""`python -m atom_jax.bench attention --tiny`: the sparse attention kernel per mode and tile spec,
interpreted on CPU, each row checked against the jnp reference (the GPU run times the same calls at
V4-Flash dims)."""

from __future__ import annotations

import json

import pytest

from atom_jax.bench.__main__ import main
from atom_jax.kernels.sparse_attention import TILES


def test_attention_bench_tiny_rows_per_tiles_and_mode(tmp_path):
    out = tmp_path / "attn.json"
    assert main(["attention", "--tiny", "--attention-tiles", "default,16x8x4x1x0x1x1x1x0x0x1,16x8x4x1x0x1x0x3",
                 "--iters", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(r["tiles"], r["mode"]): r for r in res["results"]}
    # a variant that fails (here: 64 dims in 3 pieces; on a GPU, too much shared memory) is a row, not the end
    for m in ("all", "list", "none"):
        assert "does not split into 3 pieces" in rows.pop(("16x8x4x1x0x1x0x3", m))["error"]
    assert set(rows) == {(s, m) for s in ("default", "16x8x4x1x0x1x1x1x0x0x1") for m in ("all", "list", "none")}
    for (spec, mode), r in rows.items():
        assert r["finite"] and r["max_abs_err"] < 1e-4 and r["ms"] > 0, (spec, mode)
        # the spec: transposed, q's norm and RoPE and the output's inverse RoPE in the kernel (the rows'
        # errors are against the jnp math around the reference); default: the kernel's TILES
        want = (True, True) if spec != "default" else (TILES.transpose, TILES.fuse_rope)
        assert (r["transpose"], r["fuse_rope"]) == want and r["programs"] == 32  # 32 tokens x 16 heads in one block
        programs_per_sm = max(r["programs"] / res["sms"], 1)
        assert r["us_per_step"] == pytest.approx(1e3 * r["ms"] / programs_per_sm / r["key_steps"])
        assert r["of_default"] == pytest.approx(r["ms"] / rows["default", mode]["ms"])
    # window 16 in 8-key blocks: 2 steps; the selection's 16 entries: 2 more; HCA: (pos + 1) // 128 in 8s
    assert rows["16x8x4x1x0x1x1x1x0x0x1", "none"]["key_steps"] == 2 and rows["16x8x4x1x0x1x1x1x0x0x1", "list"]["key_steps"] == 4
    assert rows["16x8x4x1x0x1x1x1x0x0x1", "all"]["key_steps"] == 3  # positions 600..631: 4 visible entries, 1 block
    assert rows["default", "all"]["key_steps"] == 2  # a 64-key block each
    with pytest.raises(SystemExit):
        main(["attention", "--tiny", "--modes", "all,hca"])
