"""The calibrated TBO step model (atom_jax.bench.tbo_model): fits recover the components that
made a synthetic calibration, predictions follow the schedule's physics, the CLI writes the
scheduler's crossover table."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from atom_jax.bench.__main__ import main
from atom_jax.bench.tbo_model import (CALIBRATION_KIND, PLATFORMS, Affine, Dims, MoeFit, StepModel,
                                      fit_calibration, load_calibrations)

DIMS = Dims("flash-like", hidden=4096, experts=256, topk=6, inter=2048, layers=43)  # V4-Flash's


def _truth(rng) -> StepModel:
    """Random but plausible H200-like components (ms per layer)."""
    return StepModel("NVIDIA H200", DIMS,
                     attn=Affine(rng.uniform(0.1, 0.5), rng.uniform(1e-3, 3e-3)),
                     moe=MoeFit(rng.uniform(0.05, 0.3), rng.uniform(5e-6, 2e-5), rng.uniform(5e-5, 1.5e-4),
                                rng.uniform(100, 300)),
                     ag=Affine(rng.uniform(0.02, 0.1), 1e3 / rng.uniform(150e9, 400e9)),
                     rs=Affine(rng.uniform(0.02, 0.1), 1e3 / rng.uniform(150e9, 400e9)),
                     gamma=float(rng.uniform(0.05, 0.4)))


def _calibration(truth: StepModel, layers: int = 2) -> dict:
    """What `dp-step --calibration` writes, with every time taken from `truth` (exact, float64)."""
    d = truth.dims
    toks = [2048, 4096, 8192, 16384]
    data = {"kind": CALIBRATION_KIND, "device": truth.device, "model": dataclasses.asdict(d),
            "attention": [{"tokens": t, "ms": truth.attn(t)} for t in toks],
            "moe": [{"dp": n, "tokens": t, "ms": truth.moe(d, n, t)} for n in (2, 4, 8) for t in toks]
            + [{"dp": 2, "tokens": t, "ms": truth.moe(d, 2, t)} for t in (256, 512, 1024)],  # the weight floor
            "collectives": [], "steps": []}
    for n in (2, 4, 8):
        for t in toks:
            data["collectives"] += [{"op": "all_gather", "dp": n, "tokens": t, "bytes": d.ag_bytes(n, t),
                                     "ms": truth.ag(d.ag_bytes(n, t))},
                                    {"op": "reduce_scatter", "dp": n, "tokens": t, "bytes": d.rs_bytes(n, t),
                                     "ms": truth.rs(d.rs_bytes(n, t))}]
        for t in toks[1:]:
            data["steps"].append({"dp": n, "emulated": True, "tokens": t, "layers": layers,
                                  "base_ms": truth.base_ms(n, t, layers), "tbo_ms": truth.tbo_ms(n, t, layers)})
    return data


def test_fit_recovers_the_components_and_extrapolates_in_dp():
    rng = np.random.default_rng()
    truth = _truth(rng)
    fitted = fit_calibration(_calibration(truth))
    assert fitted.gamma == pytest.approx(truth.gamma, abs=0.006)
    for dp in (2, 4, 8, 16, 32):  # 16 and 32 were never measured
        for t in (1024, 4096, 8192, 16384, 32768):
            assert fitted.moe(DIMS, dp, t) == pytest.approx(truth.moe(DIMS, dp, t), rel=2e-3)
            assert fitted.base_ms(dp, t, 43) == pytest.approx(truth.base_ms(dp, t, 43), rel=2e-3)
            assert fitted.tbo_ms(dp, t, 43) == pytest.approx(truth.tbo_ms(dp, t, 43), rel=1e-2)


def test_tbo_pays_only_where_communication_is_large():
    rng = np.random.default_rng()
    m = dataclasses.replace(_truth(rng), gamma=0.0)
    no_link = dataclasses.replace(m, ag=Affine(0.0, 0.0), rs=Affine(0.0, 0.0))
    for dp in (2, 8, 32):
        for t in (2048, 8192, 32768):
            # nothing to hide: the split only adds each chain's weight read and row padding
            assert no_link.tbo_ms(dp, t, 8) >= no_link.base_ms(dp, t, 8)
    slow = dataclasses.replace(m, link_scale=20.0 / m.link_GBps)  # a 20 GB/s link: overlap hides it
    assert slow.comm_share(8, 16384) > 0.4
    assert slow.tbo_ms(8, 16384, 8) < 0.9 * slow.base_ms(8, 16384, 8)
    assert slow.crossover(8) is not None and no_link.crossover(8) is None


def test_other_platforms_scale_the_link_by_published_figures():
    m = _truth(np.random.default_rng())
    mi = PLATFORMS["mi355x"]
    # point to point: one 76.8 GB/s link to the one peer at dp 2, all seven links at dp 8
    assert m.on(mi, 8).link_GBps == pytest.approx(7 * m.on(mi, 2).link_GBps)
    h = PLATFORMS["h200"]
    assert m.on(h, 2).link_GBps == pytest.approx(m.on(h, 32).link_GBps)  # switched
    # same device: compute untouched; MI355X: attention per token scaled by the FLOP ratio
    assert m.on(h, 8).attn == m.attn
    assert m.on(mi, 8).attn.b == pytest.approx(m.attn.b * h.flops / mi.flops)


def test_cli_prints_predictions_and_writes_the_crossover(tmp_path, capsys):
    truth = dataclasses.replace(_truth(np.random.default_rng()), ag=Affine(0.05, 1e3 / 20e9),
                                rs=Affine(0.05, 1e3 / 20e9), gamma=0.1)  # a slow link: TBO pays
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(_calibration(truth)))
    out, table = tmp_path / "model.json", tmp_path / "crossover.json"
    assert main(["tbo-model", "--calibration", str(cal), "--json", str(out), "--crossover-out", str(table)]) == 0
    text = capsys.readouterr().out
    assert "measured vs model" in text and "MI355X" in text
    res = json.loads(out.read_text())
    assert {r["dp"] for r in res["predictions"] if r["platform"].startswith("H200")} == {2, 4, 8, 16, 32}
    assert {r["dp"] for r in res["predictions"] if r["platform"].startswith("MI355X")} == {2, 4, 8}
    for r in res["checks"]:
        assert r["pred_base_ms"] == pytest.approx(r["base_ms"], rel=2e-3)
    cross = json.loads(table.read_text())["min_tokens"]
    assert cross["1"] is None and cross["8"] is not None
    assert cross["2"] is None or cross["2"] >= cross["8"] >= cross["32"]


def test_dp_step_outputs_calibrate_the_model(tmp_path):
    """`bench dp-step --json` rows (real dp=2, emulated 4 and 8) are enough: components derived
    from base, collectives-alone and experts-alone times give the same predictions at dp 16 / 32."""
    rng = np.random.default_rng()
    truth = _truth(rng)
    truth = dataclasses.replace(truth, rs=truth.ag)  # dp-step times AG + RS together
    layers, d = 2, truth.dims
    files = []
    for n in (2, 4, 8):
        rows = []
        for t in (4096, 8192, 16384):
            p = truth.parts(n, t)
            rows.append({"phase": "prefill", "tokens_per_rank": t, "base_ms": truth.base_ms(n, t, layers),
                         "tbo_ms": truth.tbo_ms(n, t, layers), "comm_only_ms": layers * (p["ag"] + p["rs"]),
                         "experts_ms": p["moe"], "experts_half_ms": truth.moe(d, n, t // 2)})
        dims = {"hidden_size": d.hidden, "n_routed_experts": d.experts, "num_experts_per_tok": d.topk,
                "moe_intermediate_size": d.inter, "num_layers": layers, "dtype_bytes": 2}
        path = tmp_path / f"dp{n}.json"
        path.write_text(json.dumps({"device": "NVIDIA H200", "dp": n, "emulated": n > 2, "layers": layers,
                                    "dims": dims, "results": rows}))
        files.append(str(path))
    (cal,) = load_calibrations(files)
    fitted = fit_calibration(cal)
    assert fitted.dims.name == "v4-flash" and fitted.dims.layers == 43  # the preset these dims are
    for dp in (16, 32):
        for t in (4096, 16384):
            assert fitted.base_ms(dp, t, 43) == pytest.approx(truth.base_ms(dp, t, 43), rel=5e-3)
            assert fitted.tbo_ms(dp, t, 43) == pytest.approx(truth.tbo_ms(dp, t, 43), rel=2e-2)


def test_fused_schedule_keeps_weight_reuse():
    """One expert GEMM for both chains: without communication it costs what base costs (plus
    one attention intercept per layer); where rows per expert are few (dp=2, small T: weight
    reads dominate the split's two GEMMs) it beats the split schedule."""
    rng = np.random.default_rng()
    m = dataclasses.replace(_truth(rng), gamma=0.0)
    no_link = dataclasses.replace(m, ag=Affine(0.0, 0.0), rs=Affine(0.0, 0.0))
    for dp, t in ((2, 2048), (8, 8192), (32, 16384)):
        assert no_link.fused_ms(dp, t, 8) == pytest.approx(no_link.base_ms(dp, t, 8) + 8 * m.attn.a, rel=1e-9)
    assert m.fused_ms(2, 1024, 8) < m.tbo_ms(2, 1024, 8)
