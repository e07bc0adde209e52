"""DP layer: placement, one bucket for all ranks, padding waste, TBO, gating, liveness."""

import json
import random

import pytest

from atom_jax.scheduler import (DPScheduler, RankConfig, SamplingParams, Sequence,
                                default_buckets, make_delayer)


def seq(rid, n, max_tokens=4, tok=11, **kw):
    return Sequence(rid, [tok] * n, SamplingParams(max_tokens=max_tokens, **kw))


def run_step(sched, token=7):
    plan = sched.schedule()
    out = sched.on_step_done(plan, {c.request_id: token for w in plan.per_rank for c in w
                                    if c.sample})
    return plan, out


def test_default_buckets_reach_the_budget():
    assert default_buckets(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert default_buckets(3000)[-2:] == (2048, 3000)
    with pytest.raises(ValueError, match="buckets"):
        DPScheduler(2, RankConfig(max_tokens_per_step=64), buckets=(16, 32))


def test_placement_least_pending_then_kv_usage_then_rank():
    cfg = RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=256,
                     chunk_size=256)
    sched = DPScheduler(3, cfg, delayer=make_delayer("off"))
    assert sched.add(seq("a", 100, tok=1)) == 0  # prompts that share no page
    assert sched.add(seq("b", 50, tok=2)) == 1
    assert sched.add(seq("c", 70, tok=3)) == 2
    assert sched.add(seq("d", 10, tok=4)) == 1  # rank 1 has the least pending (50)
    run_step(sched)  # every prompt is cached now: nothing pending anywhere
    usage = [r.kv_usage for r in sched.ranks]
    assert sched.add(seq("e", 5)) == min(range(3), key=lambda r: (usage[r], r))
    with pytest.raises(ValueError, match="already live"):
        sched.add(seq("a", 3))


def test_choices_of_one_prompt_compute_its_pages_once_on_one_rank():
    """Four requests with one 100-token prompt (n = 4), 16-token pages, two ranks: they go to
    one rank (their shared pages count as reused there), the first computes the 6 full pages
    while the others wait (past them, an unrelated request is admitted at once), then each
    other computes only its last 4 tokens from the cached pages."""
    cfg = RankConfig(num_slots=8, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                     chunk_size=32)
    sched = DPScheduler(2, cfg, delayer=make_delayer("off"))
    prompt = list(range(1, 101))
    ranks = [sched.add(Sequence(f"c{i}", prompt, SamplingParams(max_tokens=2))) for i in range(4)]
    assert ranks == [0, 0, 0, 0]
    other_rank = sched.add(seq("other", 40, tok=500))
    assert other_rank == 1
    first_step, _ = run_step(sched)
    assert [c.request_id for c in first_step.per_rank[0]] == ["c0"]  # the others wait for c0's pages
    assert [c.request_id for c in first_step.per_rank[1]] == ["other"]
    computed = {}
    plan = first_step
    while True:
        for w in plan.per_rank:
            for c in w:
                if c.num_tokens > 1 or c.request_id not in computed:
                    computed[c.request_id] = computed.get(c.request_id, 0) + c.num_tokens
        if not sched.has_work():
            break
        plan, _ = run_step(sched)
    assert computed["c0"] == 100 and [computed[f"c{i}"] for i in (1, 2, 3)] == [4, 4, 4]
    assert sched.metrics.snapshot()["prefill_tokens"] == 100 + 3 * 4 + 40


def test_choices_of_one_prompt_fill_one_ranks_free_slots_then_the_next():
    cfg = RankConfig(num_slots=2, num_pages=64, page_tokens=16, max_tokens_per_step=64, chunk_size=32)
    sched = DPScheduler(2, cfg, delayer=make_delayer("off"))
    prompt = list(range(1, 101))
    assert [sched.add(Sequence(f"c{i}", prompt, SamplingParams(max_tokens=2))) for i in range(5)] == [0, 0, 1, 1, 0]


def test_one_bucket_for_all_ranks_waste_and_tbo():
    cfg = RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                     chunk_size=64)
    sched = DPScheduler(4, cfg, buckets=(8, 16, 64), delayer=make_delayer("off"),
                        tbo_min_tokens=16)
    sched.add(seq("a", 10))
    plan, _ = run_step(sched)
    assert len(plan.per_rank) == 4 and plan.per_rank[1:] == [[], [], []]
    assert plan.real_tokens == [10, 0, 0, 0] and plan.bucket == 16 and plan.tbo
    assert plan.padding_waste == pytest.approx(1 - 10 / (4 * 16))
    plan, _ = run_step(sched)  # decode: one token
    assert plan.bucket == 8 and not plan.tbo
    assert plan.padding_waste == pytest.approx(1 - 1 / 32)


def test_delayer_holds_a_prefill_beside_a_decoding_rank_then_times_out():
    """A lone prefill beside an idle rank runs at once (the idle rank is padding either way);
    beside a rank that decodes it waits max_delay_passes ticks, then times out."""
    cfg = RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                     chunk_size=64)
    sched = DPScheduler(2, cfg, delayer=make_delayer("on", max_delay_passes=3))
    assert sched.schedule().is_empty  # first tick
    assert sched.add(seq("b", 10, max_tokens=50, tok=2)) == 0
    plan, _ = run_step(sched)
    assert plan.decision.outcome == "allow" and not plan.is_empty  # rank 1 idle: no wait
    assert sched.add(seq("a", 10, tok=3)) == 1  # b decodes on rank 0
    outcomes = [run_step(sched)[0].decision.outcome for _ in range(4)]
    assert outcomes == ["delay", "delay", "delay", "timeout"]
    snap = sched.metrics.snapshot()
    assert snap["delayer"]["delay"] == 3 and snap["delayer"]["timeout"] == 1
    assert snap["wait_passes_max"] == 3


def test_metrics_snapshot_is_consistent_and_json_ready():
    cfg = RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                     chunk_size=32)
    sched = DPScheduler(2, cfg, delayer=make_delayer("off"), tbo_min_tokens=64)
    for i in range(4):
        sched.add(seq(f"r{i}", 20 + 10 * i, max_tokens=3, tok=i + 1))  # no page shared
    finished = []
    while sched.has_work():
        finished += run_step(sched)[1].finished
    snap = json.loads(json.dumps(sched.metrics.snapshot()))
    assert snap["real_tokens"] + snap["padded_tokens"] == snap["slot_tokens"]
    assert snap["padding_waste"] == pytest.approx(snap["padded_tokens"] / snap["slot_tokens"])
    assert snap["real_tokens"] == snap["prefill_tokens"] + snap["decode_tokens"]
    assert snap["prefill_tokens"] == 20 + 30 + 40 + 50
    assert snap["decode_tokens"] == 4 * 2  # the first token of each comes from prefill
    assert snap["tbo_on_steps"] + snap["tbo_off_steps"] == snap["steps"]
    assert snap["finished"] == {"length": 4} and len(finished) == 4
    assert snap["num_running"] == snap["num_waiting"] == 0


@pytest.mark.parametrize("seed", range(16))
def test_liveness_random_mixes(seed):
    """Random arrivals, lengths, stop tokens, aborts and failures on idle, prefilling and
    decoding ranks: every request finishes within the liveness bound, all ranks share one
    bucket each step, and every page and slot comes back."""
    rng = random.Random(seed)
    dp = rng.choice([1, 2, 3, 8])
    slots = rng.choice([1, 2, 4, 8])
    cfg = RankConfig(num_slots=slots, num_pages=rng.choice([6, 16, 64]),
                     page_tokens=rng.choice([4, 16]),
                     max_tokens_per_step=max(slots, rng.choice([8, 32, 64])),
                     chunk_size=rng.choice([4, 16, 64]))
    mode = rng.choice(["off", "on", "coalesce"])
    max_delay = rng.choice([0, 3, 10])
    sched = DPScheduler(dp, cfg, delayer=make_delayer(
        mode, max_delay_passes=max_delay, max_wait_ticks=max_delay,
        target_fraction=rng.choice([0.3, 0.9])), tbo_min_tokens=32, eos_token_ids=(2,))
    reqs = {}
    for i in range(rng.randint(10, 50)):
        reqs[f"r{i}"] = (rng.randint(0, 80), rng.randint(1, 60), rng.randint(1, 20))
    arrivals = sorted(reqs.items(), key=lambda kv: kv[1][0])
    total = sum(n + m for _, n, m in reqs.values())
    bound = max(t for t, _, _ in reqs.values()) + (max_delay + 1) * total + 10
    finished, tick = {}, 0

    def note(seqs):
        for s in seqs:
            assert s.request_id not in finished, "finished twice"
            finished[s.request_id] = s

    while arrivals or sched.has_work():
        while arrivals and arrivals[0][1][0] <= tick:
            rid, (_, n, m) = arrivals.pop(0)
            sched.add(seq(rid, n, max_tokens=m, ignore_eos=rng.random() < 0.3))
        live = [rid for rid in reqs if rid not in finished and sched.get(rid)]
        # Aborts and failures are reported through the next step's `finished`.
        if live and rng.random() < 0.03:
            assert sched.abort(rng.choice(live)).finish_reason == "abort"
        elif live and rng.random() < 0.01:
            assert sched.fail(rng.choice(live)).finish_reason == "error"
        plan = sched.schedule()
        assert len(plan.per_rank) == dp
        assert plan.real_tokens == [sum(c.num_tokens for c in w) for w in plan.per_rank]
        assert max(plan.real_tokens) <= cfg.max_tokens_per_step
        if plan.is_empty:
            assert max(plan.real_tokens) == 0
        else:
            fits = [b for b in sched.buckets if b >= max(plan.real_tokens)]
            assert plan.bucket == fits[0]  # the smallest bucket that fits every rank
            assert plan.tbo == (plan.bucket >= 32)
            assert plan.padding_waste == pytest.approx(
                1 - sum(plan.real_tokens) / (dp * plan.bucket))
        for r, work in enumerate(plan.per_rank):
            for c in work:
                assert c.seq.rank == r and c.start_pos == c.seq.num_computed
                assert c.sample == (c.start_pos + c.num_tokens == c.seq.total_len)
        sampled = {c.request_id: (2 if rng.random() < 0.05 else 7)
                   for w in plan.per_rank for c in w if c.sample}
        note(sched.on_step_done(plan, sampled).finished)
        sched.check_invariants()
        tick += 1
        assert tick <= bound, f"not live: {tick} ticks > bound {bound}"
    note(sched.pop_finished())

    assert set(finished) == set(reqs)
    for rid, s in finished.items():
        assert s.finish_reason in ("stop", "length", "abort", "error")
        if s.finish_reason == "length":
            assert s.num_output_tokens == reqs[rid][2]
        if s.finish_reason == "stop":
            assert s.output_token_ids[-1] == 2 and not s.params.ignore_eos
    for r in sched.ranks:
        assert r.pages.num_free == cfg.num_pages and r.slots.num_free == cfg.num_slots


def test_atom_example_one_prefill_seven_decodes_wastes_86_percent():
    # ATOM's example (docs/design.md, "Keeping the ranks in step"): 8 ranks x 1024 slots, 1024 + 7 x 16 real tokens.
    cfg = RankConfig(num_slots=16, num_pages=256, page_tokens=16, max_tokens_per_step=1024,
                     chunk_size=1024)
    sched = DPScheduler(8, cfg, delayer=make_delayer("off"))
    for r in range(1, 8):
        for i in range(16):
            sched.ranks[r].add(seq(f"d{r}.{i}", 1, max_tokens=50))
    run_step(sched)
    sched.ranks[0].add(seq("p", 1024))
    plan, _ = run_step(sched)
    assert plan.real_tokens == [1024] + [16] * 7 and plan.bucket == 1024
    assert plan.padding_waste == pytest.approx(1 - 1136 / 8192)  # 86.1%


def test_tbo_auto_follows_the_per_dp_crossover_everywhere():
    """auto's threshold is this dp's entry of the crossover table (tbo_policy) for scheduler,
    engine config and server flag alike; the scheduler alone decides (the step options carry no
    TBO setting)."""
    import dataclasses

    from atom_jax.engine import EngineConfig
    from atom_jax.engine.args import engine_config
    from atom_jax.scheduler import crossover_min_tokens
    from atom_jax.serve.cli import build_parser
    from atom_jax.sharding import StepOptions
    two = crossover_min_tokens(2)
    assert two is None or two > 8192  # measured on 2 GPUs: TBO lost up to 8K tokens per rank
    assert crossover_min_tokens(1) is None  # one rank: no collective to hide, never
    assert EngineConfig().tbo_min_tokens is None
    assert engine_config(build_parser().parse_args([])).tbo_min_tokens is None
    for dp in (1, 2, 3, 8):
        assert DPScheduler(dp).tbo_min_tokens == crossover_min_tokens(dp)
    assert DPScheduler(2, tbo_min_tokens=64).tbo_min_tokens == 64  # --tbo-min-tokens overrides
    # how a TBO step is built may be an option (tbo_schedule); whether a step uses TBO is not
    assert not {"tbo", "tbo_min_tokens"} & {f.name for f in dataclasses.fields(StepOptions)}
    assert not DPScheduler(2).use_tbo(8192)
    on = next(dp for dp in (2, 4, 8, 16, 32) if crossover_min_tokens(dp) is not None)
    assert not DPScheduler(on).use_tbo(crossover_min_tokens(on) - 1) and DPScheduler(on).use_tbo(crossover_min_tokens(on))
    assert not DPScheduler(1).use_tbo(2 ** 20)


def test_crossover_table_lookup(tmp_path):
    """A dp missing from the table takes the nearest smaller dp's entry, else the default; the
    file `bench tbo-model --crossover-out` writes is the table's format."""
    import json

    from atom_jax.bench.__main__ import main
    from atom_jax.scheduler.tbo_policy import crossover_min_tokens
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"min_tokens": {"2": None, "4": 8192, "8": 2048}, "default": 777}))
    got = {dp: crossover_min_tokens(dp, str(path)) for dp in (1, 2, 3, 4, 6, 8, 32)}
    assert got == {1: 777, 2: None, 3: None, 4: 8192, 6: 8192, 8: 2048, 32: 2048}
    cal = tmp_path / "cal.json"  # a dp-step run whose TBO wins big at dp=8: a slow link
    rows = [{"phase": "prefill", "tokens_per_rank": t, "base_ms": 2.0 * t / 1024, "tbo_ms": 1.2 * t / 1024,
             "comm_only_ms": 0.9 * t / 1024, "experts_ms": 0.3 * t / 1024, "experts_half_ms": 0.16 * t / 1024}
            for t in (4096, 8192, 16384)]
    cal.write_text(json.dumps({"device": "NVIDIA H200", "dp": 8, "layers": 2, "results": rows, "dims": {
        "hidden_size": 4096, "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
        "num_layers": 2}}))
    out = tmp_path / "crossover.json"
    assert main(["tbo-model", "--calibration", str(cal), "--crossover-out", str(out)]) == 0
    assert crossover_min_tokens(8, str(out)) is not None
    assert crossover_min_tokens(1, str(out)) is None


def test_tbo_decision_modes():
    """auto follows the threshold; on / off force it; a bucket that cannot split never splits."""
    auto = DPScheduler(1, tbo_min_tokens=1024)
    assert not auto.use_tbo(1022) and auto.use_tbo(1024) and auto.use_tbo(4096)
    assert not DPScheduler(1, tbo_min_tokens=None).use_tbo(10**6)
    on, off = DPScheduler(1, tbo=True), DPScheduler(1, tbo=False, tbo_min_tokens=16)
    assert on.use_tbo(16) and not on.use_tbo(1) and not on.use_tbo(17)
    assert not off.use_tbo(10**6)
    cfg = RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64, chunk_size=64)
    sched = DPScheduler(1, cfg, delayer=make_delayer("off"), tbo=True)
    sched.add(Sequence("a", [1] * 40, SamplingParams(max_tokens=2)))
    plan = sched.schedule()
    assert plan.bucket == 64 and plan.tbo
