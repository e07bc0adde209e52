"""`python -m atom_jax.bench decode` on the tiny model: every loop (synchronous, overlap, overlap
with the dispatch thread) reports its host time per step by phase, measured over the timed steps."""

from __future__ import annotations

import json

import pytest

from atom_jax.bench.__main__ import main
from atom_jax.engine.host_timing import PHASES


def test_bench_decode_reports_host_time_by_phase(tmp_path):
    out = tmp_path / "decode.json"
    # 8 prompts of 16 tokens prefill one per step (the tiny bench's 16-token budget): the first
    # sequences decode meanwhile, and must all still be decoding through the timed steps
    assert main(["decode", "--tiny", "--batches", "8", "--steps", "3", "--warmup", "1", "--prompt-len", "16",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["off", "on", "thread"]
    for r in results:
        assert r["tokens_per_step"] == 8, r
        host = r["host_ms"]
        assert host["steps"] == 3 and all(host[p] >= 0 for p in PHASES), r
        assert host["host"] == pytest.approx(sum(host[p] for p in PHASES if p != "wait"), abs=1e-3)
        assert host["total"] == pytest.approx(host["host"] + host["wait"], abs=1e-3)
        # the loop's own time per step is what the phases add up to, give or take the bench's loop
        assert host["total"] <= r["ms_per_step"] * 1.05 + 0.05, r
        assert host["schedule"] > 0 and host["resolve"] > 0
        # each timed iteration's spread: the mean lies within [min, max], median <= p90 <= max
        assert 0 < r["ms_per_step_median"] <= r["ms_per_step_p90"] <= r["ms_per_step_max"], r
        assert r["ms_per_step"] <= r["ms_per_step_max"] + 1e-3, r
    off, on, thread = results
    assert off["host_ms"]["launch"] > 0 and on["host_ms"]["launch"] > 0
    assert "dispatch_thread" not in on["host_ms"]
    # the engine thread packs the step (`ModelRunner.prepare`); the dispatch thread only calls
    # the program (the last launch may still be running when the engine thread reads the clock)
    worker = thread["host_ms"]["dispatch_thread"]
    assert worker["steps"] >= 2 and worker["launch"] > 0 and worker["pack"] == 0
    assert thread["host_ms"]["pack"] > 0


def test_bench_decode_pages_cover_the_prefill_steps_tokens(tmp_path):
    """A prompt whose pages leave little room (120 of 128 tokens): the tokens sequences emit while
    later prompts prefill still fit the context the bench sized (it raised InvalidRequest before)."""
    out = tmp_path / "full_pages.json"
    assert main(["decode", "--tiny", "--batches", "2", "--steps", "2", "--warmup", "1", "--prompt-len", "120",
                 "--modes", "on", "--json", str(out)]) == 0
    assert [r["tokens_per_step"] for r in json.loads(out.read_text())["results"]] == [2]


def test_bench_decode_expert_layout(tmp_path):
    """--expert-layout kmajor: the random bf16 experts held [E, N, K], recorded in the JSON; a bad name
    stops before any work."""
    out = tmp_path / "kmajor.json"
    assert main(["decode", "--tiny", "--batches", "2", "--steps", "2", "--warmup", "1", "--prompt-len", "16",
                 "--modes", "on", "--expert-layout", "kmajor", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["expert_layout"] == "kmajor" and data["results"][0]["tokens_per_step"] == 2
    with pytest.raises(SystemExit, match="expert-layout"):
        main(["decode", "--tiny", "--expert-layout", "kmajr"])


def test_launch_summary_averages_devices():
    from atom_jax.bench.decode import _launch_summary

    la = [{"per_step": 100.0, "short_per_step": 80.0, "per_layer_mean": 20.0},
          {"per_step": 110.0, "short_per_step": 90.0, "per_layer_mean": None}]
    assert _launch_summary(la) == {"launches_per_step": 105.0, "short_launches_per_step": 85.0,
                                   "launches_per_layer": 20.0}
    assert _launch_summary([]) == {}


def test_bench_decode_replay_probes_and_command_buffer_modes(tmp_path):
    """--replay: the last timed step dispatched again N times (runner, then the bare compiled call),
    in the overlap loop and with the dispatch thread; the case's requests then run to their end.
    --command-buffers xla,off: every case once per step program build, in that order."""
    out = tmp_path / "replay.json"
    assert main(["decode", "--tiny", "--batches", "2", "--steps", "2", "--warmup", "1", "--prompt-len", "16",
                 "--modes", "on,thread", "--replay", "3", "--command-buffers", "xla,off", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert "env" in json.loads(out.read_text()) and "platform_version" in json.loads(out.read_text())
    assert [(r["command_buffers"], r["mode"]) for r in results] == [
        ("xla", "on"), ("xla", "thread"), ("off", "on"), ("off", "thread")]
    for r in results:
        assert r["replay_steps"] == 3, r
        assert r["replay_run_ms"] > 0 and r["replay_call_ms"] > 0 and r["replay_call_launch_ms"] > 0, r
        # every call returned before the final wait, so one call's return cannot exceed a step
        assert r["replay_call_launch_ms"] <= r["replay_call_ms"] * 1.05 + 0.05, r
        assert 0 < r["replay_call_placed_launch_ms"] <= r["replay_call_placed_ms"] * 1.05 + 0.05, r
        assert r["replay_idle_launch_ms"] > 0 and r["replay_args_launch_ms"] > 0, r
        assert r["replay_read_ms"] > 0 and r["replay_sync_ms"] > 0, r


def test_bench_decode_runs_every_case_per_decode_topk_policy(tmp_path):
    """--decode-topk auto,rowselect: the step programs built once per decode top-k policy (the
    module's AUTO_POLICY while they are traced), every case run with each, labelled; the
    module's default is back afterwards. (The tiny CPU engine runs the jnp attention, whose
    top-k is always the loop: that a policy reaches the kernel path's plan is `plan_topk`'s own
    test in test_index_topk.py.)"""
    from atom_jax.models import index_topk

    default = index_topk.AUTO_POLICY
    out = tmp_path / "topk.json"
    assert main(["decode", "--tiny", "--batches", "2", "--steps", "2", "--warmup", "1", "--prompt-len", "16",
                 "--modes", "on", "--decode-topk", "auto,rowselect", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["decode_topk"]) for r in results] == [("xla/auto", "auto"), ("xla/rowselect", "rowselect")]
    assert all(r["output_tok_s"] > 0 for r in results)
    assert index_topk.AUTO_POLICY == default and index_topk.AUTO_SWITCH_FREE == "flat"
    with pytest.raises(SystemExit):
        main(["decode", "--tiny", "--decode-topk", "sorted"])
