"""`python -m atom_jax.bench engine` on the tiny model (CPU, dp=2): every request of the random
workload completes with exactly its lengths, in process and through the HTTP server (--http),
the concurrency cap holds, and the reported throughputs and latencies agree with the token
counts and with each other."""

from __future__ import annotations

import argparse
import json

import pytest

from atom_jax.bench import engine as engine_bench
from atom_jax.bench.workload import random_requests


def parse(argv):
    parser = argparse.ArgumentParser()
    engine_bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["engine", *argv])


def test_engine_bench_tiny_dp2(tmp_path):
    out = tmp_path / "engine.json"
    argv = ["--preset", "tiny", "--dp", "2", "--num-slots", "4", "--page-tokens", "32",
            "--max-tokens-per-step", "64", "--chunk-size", "32", "--buckets", "16,64",
            "--compilation-cache-dir", "off", "--num-prompts", "6", "--random-input-len", "40",
            "--random-output-len", "5", "--random-range-ratio", "0.5", "--max-concurrency", "3",
            "--delayer-modes", "off,on", "--compile-workers", "2", "--http", "--json", str(out)]
    args = parse(argv)
    assert engine_bench.run_cli(args) == 0
    res = json.loads(out.read_text())
    reqs = random_requests(6, 40, 5, 0.5, seed=args.workload_seed)
    # sized to the longest request: 45 tokens, 2 pages of 32 for each of the 4 slots
    assert (res["engine"]["max_model_len"], res["engine"]["num_pages"]) == (45, 8)
    assert [(r["delayer"], r.get("http", False)) for r in res["runs"]] == [("off", False), ("on", False),
                                                                          ("off", True)]
    assert set(res["precompile_s"]["auto"]) == {"16", "64"}  # both buckets built ahead, no TBO
    temp = res["program_temp_bytes"]["auto"]  # XLA's memory analysis of each step program
    assert set(temp) == {"16", "64"} and 0 < temp["16"] <= temp["64"] and res["tbo_modes_left_out"] == {}
    assert res["memory_plan"]["reserve_bytes"] == temp["64"]  # the largest step's, not the fixed 8 GiB
    for r in res["runs"]:
        assert (r["completed"], r["failed"]) == (6, 0)
        assert r["total_input_tokens"] == sum(q.input_len for q in reqs)
        assert r["total_output_tokens"] == sum(q.output_len for q in reqs)
        assert r["max_in_flight"] in (3, None)  # all arrive at t=0, the cap holds them to 3
        d = r["duration_s"]
        assert abs(r["total_token_throughput"] * d - (r["total_input_tokens"] + r["total_output_tokens"])) < 1e-6
        assert abs(2 * r["total_token_throughput_per_gpu"] - r["total_token_throughput"]) < 1e-6
        ttft, tpot, e2e = r["ttft"], r["tpot"], r["e2e_latency"]
        assert 0 < ttft["median_ms"] <= ttft["p99_ms"] <= e2e["p99_ms"] <= 1e3 * d
        assert tpot["mean_ms"] > 0
        assert 0 <= r["padding_waste"] < 1 and r["steps"] > 0
        assert r["tbo_on_steps"] == 0 and r["tbo_off_steps"] == r["steps"]  # below tbo_min_tokens
    assert res["runs"][0]["delayer_outcomes"]["delay"] == 0  # off never delays


def test_a_tbo_mode_that_does_not_fit_is_left_out(tmp_path, monkeypatch, capsys):
    """--tbo-modes off,on where the TBO programs need more than the GPUs have free (faked: 1 byte
    free for them): the TBO-on mode is reported with the bucket and the flags to lower and left
    out, the TBO-off mode still warms up, the exit status says something was left out."""
    from atom_jax.engine import runner as runner_mod

    real = runner_mod.check_program_fits
    monkeypatch.setattr(runner_mod, "check_program_fits", lambda what, temp, free, lower: real(
        what, temp, (1, 2 ** 30) if "TBO on" in what else free, lower))
    out = tmp_path / "engine.json"
    args = parse(["--preset", "tiny", "--dp", "2", "--num-slots", "2", "--page-tokens", "32",
                  "--max-tokens-per-step", "32", "--chunk-size", "32", "--buckets", "32",
                  "--compilation-cache-dir", "off", "--num-prompts", "2", "--random-input-len", "8",
                  "--random-output-len", "2", "--tbo-modes", "off,on", "--compile-workers", "1",
                  "--compile-only", "--json", str(out)])
    assert engine_bench.run_cli(args) == 1
    res = json.loads(out.read_text())
    assert list(res["warmup_s"]) == ["off"] and list(res["tbo_modes_left_out"]) == ["on"]
    why = res["tbo_modes_left_out"]["on"]
    assert "bucket 32 (TBO on)" in why and "--max-tokens-per-step" in why and "--num-slots" in why
    assert res["program_temp_bytes"]["on"]["32 tbo"] > 1  # compiled, measured, then refused
    assert "TBO on: left out" in capsys.readouterr().out


def test_precompiled_steps_run_without_compiling_and_match_the_jit_path():
    """ModelRunner.precompile builds a bucket's step ahead (threads); the engine's steps then
    use it: the same greedy tokens as an engine that compiles on first use, and no compile
    inside its steps (the sampler's jit is already warm from the first engine)."""
    from atom_jax.engine import Engine, EngineConfig, SamplingParams
    from atom_jax.loader import random_model
    from atom_jax.config import tiny

    model = random_model(tiny(), seed=3)
    ec = dict(model="random", dp=2, num_slots=2, page_tokens=32, max_model_len=64, num_pages=4,
              max_tokens_per_step=32, chunk_size=32, buckets=(32,), compilation_cache_dir=None)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs, counts = [], []
    for ahead in (False, True):
        eng = Engine(EngineConfig(**ec), model=model, tokenizer=None)
        if ahead:
            times = eng.runner.precompile([(32, False)], workers=2)
            assert list(times) == [(32, False)] and times[(32, False)][1] > 0
        outs.append([o.token_ids for o in eng.generate(prompts, params)])
        counts.append(eng.snapshot()["step_compiles"]["count"])
    assert outs[0] == outs[1] and all(len(t) == 3 for t in outs[0])
    assert counts[0] >= 1 and counts[1] == 0  # the first compiled its step on use; the second none


def test_engine_bench_concurrency_list_on_one_engine_and_a_saturated_trace(tmp_path):
    """--max-concurrency 1,4 --num-prompts 2,6: two timed runs on one compiled engine, run i
    sends the first num_prompts[i] requests of one workload; --trace --trace-decode profiles the
    last run's saturated steps once none prefills (40-token prompts in 32-token chunks: not the
    first saturated step) and the JSON keeps the report's per-device summary."""
    out, trace_dir = tmp_path / "engine.json", tmp_path / "trace"
    argv = ["--preset", "tiny", "--dp", "2", "--num-slots", "4", "--page-tokens", "32",
            "--max-tokens-per-step", "64", "--chunk-size", "32", "--buckets", "64",
            "--compilation-cache-dir", "off", "--num-prompts", "2,6", "--random-input-len", "40",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--max-concurrency", "1,4",
            "--compile-workers", "0", "--trace", str(trace_dir), "--trace-steps", "2", "--trace-decode", "--json", str(out)]
    args = parse(argv)
    assert engine_bench.run_cli(args) == 0
    res = json.loads(out.read_text())
    reqs = random_requests(6, 40, 6, 0.5, seed=args.workload_seed)
    rows = res["runs"]
    assert [(r["max_concurrency"], r["num_prompts"]) for r in rows] == [(1, 2), (4, 6)]
    for r in rows:
        n = r["num_prompts"]
        assert (r["completed"], r["failed"]) == (n, 0)
        assert r["total_input_tokens"] == sum(q.input_len for q in reqs[:n])  # the workload's first n
        assert r["total_output_tokens"] == sum(q.output_len for q in reqs[:n])
        assert r["max_in_flight"] == r["max_concurrency"]
    assert [r.get("traced", False) for r in rows] == [False, True]  # only the last run is traced
    trace = res["trace"]
    assert trace["taken"] and trace["in_flight"] == 4 and trace["annotated_steps"] == 2
    assert trace["started_at_step"] > trace["saturated_at_step"] >= 1  # admitted in an earlier step
    assert trace["prefilling"] == 0 and trace["running"] == 4 and res["finished"]
    assert trace["devices"] and list(trace_dir.glob("plugins/profile/*/*.xplane.pb"))
    for d in trace["devices"].values():
        assert 0 < d["busy_ms"] <= d["step_time_ms"] * 1.01 and d["busy_share"] > 0
        assert d["top_kernels"] and sum(d["categories_union_ms"].values()) >= d["busy_ms"] * 0.99
    with pytest.raises(SystemExit, match="num-prompts"):  # 3 counts for 2 concurrencies
        engine_bench.run(parse(["--num-prompts", "2,6,8", "--max-concurrency", "1,4"]))


def test_modes_cross_every_concurrency_or_only_the_last():
    from atom_jax.bench.engine import run_combos

    plan = [(1, 2), (64, 64), (128, 256)]
    full = run_combos(plan, ["off", "on"], [False, True])
    assert len(full) == 12 and full[:4] == [(1, 2, "off", False), (1, 2, "on", False), (1, 2, "off", True),
                                            (1, 2, "on", True)]
    last = run_combos(plan, ["off", "on", "coalesce"], [False, True], "last")
    assert last[:2] == [(1, 2, "off", False), (64, 64, "off", False)]
    assert last[2:] == [(128, 256, d, t) for t in (False, True) for d in ("off", "on", "coalesce")]
