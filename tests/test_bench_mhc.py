"""`python -m atom_jax.bench mhc --tiny` on CPU: the rows it writes and what they compare."""

import json

import pytest

from atom_jax.bench.__main__ import main


def test_mhc_bench_smoke(tmp_path):
    """The jnp row is the reference (no difference from itself); the kernel rows, interpreted here,
    agree with it: the streams exactly (float32 streams in the tiny run), the mixes to float32 level;
    a malformed tiles spec is refused before any work."""
    out = tmp_path / "mhc.json"
    assert main(["mhc", "--tiny", "--tiles", "default,16x16x4x2x16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["jnp", "default", "16x16x4x2x16"]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[0]["streams_diff_steps"] == 0 and rows[0]["mixes_rel_diff"] == 0
    for r in rows[1:]:
        assert r["streams_diff_steps"] == 0 and r["mixes_rel_diff"] < 1e-5
    with pytest.raises(SystemExit, match="BTxBDxWARPSxSTAGESxCHUNK"):
        main(["mhc", "--tiny", "--tiles", "16x16"])
