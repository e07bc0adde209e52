"""The bf16 grouped GEMM's tile choice by rows per expert (decode / mid / prefill) and the
prefill tile sweep (`python -m atom_jax.bench gemm --prefill-tiles`) on CPU."""

import argparse
import dataclasses
import json

import numpy as np
import pytest

from atom_jax.bench import gemm_tiles
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels import pallas_grouped_gemm as pg

MID = pg.TileConfig(64, 128, 64, 4, 3)  # distinct from DECODE_TILES and PREFILL_TILES


@pytest.mark.parametrize("rows,want", [(1, "decode"), (pg.DECODE_MAX_ROWS_PER_GROUP - 0.5, "decode"),
                                       (pg.DECODE_MAX_ROWS_PER_GROUP, "mid"), (192, "mid"),
                                       (pg.MID_MAX_ROWS_PER_GROUP - 0.5, "mid"),
                                       (pg.MID_MAX_ROWS_PER_GROUP, "prefill"), (384, "prefill")])
def test_default_tiles_has_three_regimes(monkeypatch, rows, want):
    """Changing MID_TILES alone moves the mid regime (dp=1 prefill chunks: 8K tokens x 6 / 256
    experts = 192 rows per expert); dp=2's 384 rows keep PREFILL_TILES."""
    monkeypatch.setattr(pg, "MID_TILES", MID)
    assert pg.default_tiles(rows) == {"decode": pg.DECODE_TILES, "mid": MID, "prefill": pg.PREFILL_TILES}[want]
    assert pg.DECODE_MAX_ROWS_PER_GROUP < 192 < pg.MID_MAX_ROWS_PER_GROUP <= 384
    # a gathered call (row ids) differs in the mid regime alone: MID_TILES with half tails
    half = dataclasses.replace(MID, half_tail=True)
    assert pg.default_tiles(rows, gathered=True) == {"decode": pg.DECODE_TILES, "mid": half,
                                                     "prefill": pg.PREFILL_TILES}[want]
    monkeypatch.setattr(pg, "MID_HALF_TAIL_GATHERED", False)
    assert pg.default_tiles(rows, gathered=True) == pg.default_tiles(rows)


def test_seam_picks_mid_tiles_from_the_callers_rows_per_expert(monkeypatch):
    """The pallas backend passes the routing shape's mean rows per expert (not this call's
    rows over its experts) to default_tiles."""
    monkeypatch.setattr(pg, "MID_TILES", MID)
    seen = []
    monkeypatch.setattr(pg, "grouped_gemm", lambda *a, cfg=None, **kw: seen.append(cfg))
    x, w = np.zeros((8, 4), np.float32), np.zeros((2, 4, 4), np.float32)
    sizes = np.array([4, 4], np.int32)
    for mean in (192, 384, 8):
        grouped_gemm.get("pallas")(x, w, sizes, mean_group=mean)
    assert seen == [MID, pg.PREFILL_TILES, pg.DECODE_TILES]
    seen.clear()  # the same with row ids (the gate and up calls): half tails in the mid regime only
    for mean in (192, 384, 8):
        grouped_gemm.get("pallas")(x, w, sizes, mean_group=mean, row_ids=np.arange(8, dtype=np.int32))
    assert seen == [dataclasses.replace(MID, half_tail=True), pg.PREFILL_TILES, pg.DECODE_TILES]


def test_tiles_spec_round_trips_and_refuses_what_it_cannot_read():
    """The GPU scripts' tiles spec (with_tiles.py, one_gemm.py, next.sh): TileConfig -> spec ->
    the same TileConfig, half tail included; malformed specs are refused."""
    import dataclasses

    for cfg in (pg.PREFILL_TILES, pg.TileConfig(128, 256, 64, 8, 4, half_tail=True)):
        spec = gemm_tiles.tiles_spec(dataclasses.asdict(cfg))
        assert gemm_tiles.tiles_from_spec(spec) == cfg
    assert gemm_tiles.tiles_spec(dataclasses.asdict(pg.TileConfig(128, 256, 64, 8, 4, half_tail=True))) == \
        "128x256x64x8x4xht"
    for bad in ("128x256x64x8", "128x256x64x8x4xft", "128x256x64x8xfour"):
        with pytest.raises(ValueError):
            gemm_tiles.tiles_from_spec(bad)


def test_constant_line_is_the_least_total_time_over_every_case():
    a, b = pg.TileConfig(64, 128, 64, 4, 3), pg.TileConfig(128, 256, 64, 8, 4)
    c = pg.TileConfig(64, 256, 64, 4, 4)
    rows = [{"case": "up", "tiles": a.__dict__, "ms": 1.0}, {"case": "down", "tiles": a.__dict__, "ms": 3.0},
            {"case": "up", "tiles": b.__dict__, "ms": 2.0}, {"case": "down", "tiles": b.__dict__, "ms": 1.5},
            {"case": "up", "tiles": c.__dict__, "ms": 0.5}, {"case": "down", "tiles": c.__dict__, "error": "x"}]
    line = gemm_tiles.constant_line("MID_TILES", rows)  # c is fastest on "up" but failed "down"
    assert line == ("MID_TILES = TileConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4)")
    assert eval(line.split(" = ")[1], {"TileConfig": pg.TileConfig}) == b
    assert gemm_tiles.constant_line("MID_TILES", rows[-1:]) is None


def test_case_inputs_are_the_moes_calls():
    """dp=2: every rank multiplies both ranks' tokens; half the choices are its experts'."""
    rng = np.random.default_rng()
    (a, ids, sizes), = gemm_tiles.case_inputs(gemm_tiles.Case("up", 2, tokens=16), rng, 8, 64, 128, copies=1)
    assert a.shape == (32, 64) and ids.shape == (32 * 6,) and int(ids.max()) < 32
    assert int(sizes.sum()) == 16 * 6 and sizes.shape == (8,)
    (a, ids, sizes), = gemm_tiles.case_inputs(gemm_tiles.Case("down", 1, tokens=16), rng, 8, 128, 64, copies=1)
    assert a.shape == (96, 128) and ids is None and int(sizes.sum()) == 96
    assert gemm_tiles.Case("up", 1).rows_per_group == 192 and gemm_tiles.Case("down", 2).rows_per_group == 384


def test_prefill_tile_sweep_runs_on_cpu(tmp_path):
    path = tmp_path / "tiles.json"
    args = argparse.Namespace(tiny=True, iters=1, budget_s=600.0, compile_threads=2, json=str(path))
    assert gemm_tiles.run(args) == 0
    out = json.loads(path.read_text())
    assert len(out["rows"]) == len(gemm_tiles.TINY_CASES) * len(gemm_tiles.TINY_CANDIDATES)
    assert all(r["ms"] > 0 and r["max_err_vs_first"] < 1e-6 for r in out["rows"])
    assert set(out["best"]) == {c.name for c in gemm_tiles.TINY_CASES}
    assert out["set"]["MID_TILES"].startswith("MID_TILES = TileConfig(")
    gate_up = {r["variant"]: r for r in out["gate_up"]}  # the up case's SwiGLU(x w1, x w3) both ways
    assert set(gate_up) == {"two_calls", "fused"} and gate_up["fused"]["max_err_vs_two_calls"] < 2e-2


def test_fuse_and_pair_lines_are_the_best_fused_tiles_against_the_two_calls():
    derived = pg.pair_tiles(192).__dict__
    other = pg.TileConfig(64, 128, 64, 4, 4).__dict__

    def rows(*cases):  # (rows per expert, two calls ms, fused at pair_tiles ms, fused at `other` ms)
        return [{"case": f"up{rpg}", "rows_per_group": rpg, "variant": v, "tiles": t, "ms": ms}
                for rpg, two, fused, alt in cases
                for v, t, ms in (("two_calls", derived, two), ("fused", derived, fused), ("fused 64", other, alt))]

    def lines(*cases):
        return gemm_tiles.fuse_line(rows(*cases)), gemm_tiles.pair_line(rows(*cases))

    assert lines((192, 2.0, 1.8, 9), (384, 4.0, 3.9, 9)) == ("FUSE_GATE_UP_MIN_ROWS_PER_GROUP = 192", None)
    assert lines((192, 2.0, 2.1, 9), (384, 4.0, 3.9, 9))[0] == "FUSE_GATE_UP_MIN_ROWS_PER_GROUP = 384"
    assert lines((192, 2.0, 1.8, 9), (384, 4.0, 4.1, 9))[0] is None
    # the 64-row pair tiles are best in total: judged at those, and PAIR_TILES says so
    fuse, pair = lines((192, 2.0, 2.1, 1.5), (384, 4.0, 4.1, 3.5))
    assert fuse == "FUSE_GATE_UP_MIN_ROWS_PER_GROUP = 192"
    assert pair == "PAIR_TILES = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)"


def test_pair_tiles_is_the_constant_when_set(monkeypatch):
    assert pg.pair_tiles(192).block_n == pg.default_tiles(192).block_n // 2
    monkeypatch.setattr(pg, "PAIR_TILES", MID)
    assert pg.pair_tiles(192) == pg.pair_tiles(1000) == MID
