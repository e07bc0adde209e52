"""Scheduler simulator: workload semantics, the CLI and its JSON, and the delayer's effect on
padding waste for an 8K/1K-like workload scaled down to 2048 in / 256 out."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from atom_jax.bench.__main__ import main
from atom_jax.bench.cost_model import StepCostModel
from atom_jax.bench.sim import simulate
from atom_jax.bench.workload import random_requests
from atom_jax.scheduler import RankConfig


def test_random_workload_semantics():
    reqs = random_requests(2000, 1000, 100, 0.5, request_rate=4.0, seed=3)
    ins = np.array([r.input_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= 500 and ins.max() <= 1000 and outs.min() >= 50 and outs.max() <= 100
    t = np.array([r.arrival_time for r in reqs])
    assert np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.1)  # Poisson at 4 req/s
    assert all(r.arrival_time == 0 for r in random_requests(5, 10, 10, 1.0, math.inf))
    assert [r.input_len for r in random_requests(5, 10, 10, 1.0)] == [10] * 5
    with pytest.raises(ValueError):
        random_requests(5, 10, 10, 1.5)


def test_cost_model_charges_the_bucket_and_tbo():
    from atom_jax.scheduler import DPScheduler, SamplingParams, Sequence, make_delayer
    sched = DPScheduler(2, RankConfig(num_slots=4, num_pages=64, page_tokens=16,
                                      max_tokens_per_step=64, chunk_size=64),
                        delayer=make_delayer("off"), tbo_min_tokens=64)
    sched.add(Sequence("a", [1] * 50, SamplingParams(max_tokens=2)))
    plan = sched.schedule()
    cm = StepCostModel(a=1.0, b=0.5, c=0.0, tbo_factor=0.5)
    assert plan.bucket == 64 and plan.tbo
    assert cm.step_time(plan) == pytest.approx((1.0 + 0.5 * 64) * 0.5)
    assert cm.attn_pairs(plan.per_rank[0]) == 50 * 51 // 2


def test_cli_writes_json_with_padding_waste(tmp_path):
    path = tmp_path / "sim.json"
    rc = main(["sim", "--dp", "2", "--delayer", "on", "--num-prompts", "12",
               "--random-input-len", "64", "--random-output-len", "8",
               "--random-range-ratio", "0.5", "--request-rate", "50", "--seed", "0",
               "--max-tokens-per-step", "128", "--chunk-size", "128", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert 0.0 <= data["padding_waste"] <= 1.0
    for key in ("steps", "modelled_throughput_tok_s", "mean_ttft_ms", "delayer", "config"):
        assert key in data
    assert data["completed"] == 12 and data["failed"] == 0
    assert set(data["delayer"]) >= {"allow", "delay", "timeout", "watermark"}


def test_cli_compare_and_module_entry_point(tmp_path):
    path = tmp_path / "cmp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "atom_jax.bench", "sim", "--compare", "--dp", "2",
         "--num-prompts", "10", "--random-input-len", "64", "--random-output-len", "8",
         "--max-concurrency", "4", "--max-tokens-per-step", "128", "--chunk-size", "64",
         "--json", str(path)], capture_output=True, text=True, check=True)
    assert "padding waste" in proc.stdout
    data = json.loads(path.read_text())
    assert set(data["padding_waste"]) == {"off", "on", "coalesce"}
    assert all(r["completed"] == 10 for r in data["runs"].values())


def test_8k1k_like_workload_delayer_halves_padding_waste():
    """2048 in / 256 out (8:1 like 8K/1K), dp=8, 32 requests in flight per rank."""
    reqs = random_requests(768, 2048, 256, 0.5, seed=1)
    cfg = RankConfig()  # defaults: 64 slots, 2048-token budget and chunk
    res = {mode: simulate(reqs, dp=8, mode=mode, rank_config=cfg, max_concurrency=256)
           for mode in ("off", "on", "coalesce")}
    off, on, co = (res[m]["padding_waste"] for m in ("off", "on", "coalesce"))
    assert on <= 0.5 * off, res
    assert co <= 0.5 * off, res
    for r in res.values():
        assert r["completed"] == 768 and r["failed"] == 0
    # Aligned prefills also pay off in modelled time (padded slots cost like real ones).
    assert res["on"]["modelled_throughput_tok_s"] > res["off"]["modelled_throughput_tok_s"]


def _dp_step_json(tmp_path, dp):
    """A `bench dp-step --json` output with made-up but consistent times (ms)."""
    rows = [{"phase": "prefill", "tokens_per_rank": t, "base_ms": 2.0 * t / 1024, "tbo_ms": 1.6 * t / 1024,
             "comm_only_ms": 0.6 * t / 1024, "experts_ms": 0.3 * t / 1024, "experts_half_ms": 0.16 * t / 1024}
            for t in (4096, 8192, 16384)]
    path = tmp_path / f"dp{dp}.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "dp": dp, "layers": 2, "results": rows, "dims": {
        "hidden_size": 4096, "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
        "num_layers": 2}}))
    return str(path)


def test_calibrated_cost_model_times_steps_from_the_fitted_step_model(tmp_path):
    from atom_jax.bench.sim import calibrated_step_model
    from atom_jax.scheduler import DPScheduler, SamplingParams, Sequence, make_delayer
    model = calibrated_step_model([_dp_step_json(tmp_path, 8)])
    assert model.dims.layers == 43  # the full V4-Flash, not the 2 benchmarked layers
    cm = StepCostModel.calibrated(model, dp=8, c=1e-9)
    for tbo in (False, True):
        sched = DPScheduler(8, RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                                          chunk_size=64), delayer=make_delayer("off"), tbo=tbo)
        sched.add(Sequence("a", [1] * 50, SamplingParams(max_tokens=2)))
        plan = sched.schedule()
        assert plan.tbo == tbo
        want = model.step_ms(8, plan.bucket, tbo) / 1e3 + 1e-9 * (50 * 51 // 2)
        assert cm.step_time(plan) == pytest.approx(want)
    assert model.step_ms(8, 64, True) != model.step_ms(8, 64, False)
    rc = main(["sim", "--dp", "8", "--num-prompts", "8", "--random-input-len", "64", "--random-output-len", "4",
               "--max-tokens-per-step", "128", "--chunk-size", "128", "--calibration", _dp_step_json(tmp_path, 8),
               "--json", str(tmp_path / "sim.json")])
    assert rc == 0 and json.loads((tmp_path / "sim.json").read_text())["completed"] == 8
