"""One DP rank: token budget, chunked prefill, decode priority, stops, memory, abort/fail."""

import pytest

from atom_jax.scheduler import PENDING, RankConfig, RankScheduler, SamplingParams, Sequence


def make(num_slots=4, num_pages=64, page_tokens=16, budget=64, chunk=32, eos=(2,)):
    return RankScheduler(RankConfig(num_slots, num_pages, page_tokens, budget, chunk),
                         eos_token_ids=eos)


def seq(rid, n, max_tokens=4, **kw):
    return Sequence(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, **kw))


def step(rs, allow=True, token=7):
    work = rs.schedule(allow_prefill=allow)
    for c in work:  # the plan is consistent with what is cached
        assert c.start_pos == c.seq.num_computed
        assert c.sample == (c.start_pos + c.num_tokens == c.seq.total_len)
        assert len(c.token_ids()) == c.num_tokens
    rs.on_step_done(work, {c.request_id: token for c in work if c.sample})
    rs.check_invariants()
    return work


def drain(rs, limit=1000, **kw):
    for _ in range(limit):
        if not rs.has_work():
            return
        step(rs, **kw)
    raise AssertionError("rank did not drain")


def assert_all_free(rs):
    assert rs.pages.num_free == rs.pages.num_pages and rs.slots.num_free == rs.slots.num_slots
    assert not rs.running and not rs.waiting and not rs.has_work()


def test_chunked_prefill_cuts_at_chunk_size_then_decodes():
    rs = make(chunk=32, budget=64)
    s = seq("a", 75, max_tokens=3)
    rs.add(s)
    shapes = [[(c.start_pos, c.num_tokens, c.sample) for c in step(rs)] for _ in range(5)]
    assert shapes == [[(0, 32, False)], [(32, 32, False)], [(64, 11, True)],
                      [(75, 1, True)], [(76, 1, True)]]
    assert s.is_finished and s.finish_reason == "length" and s.output_token_ids == [7, 7, 7]
    assert_all_free(rs)


def test_budget_respected_and_shared_between_prefills():
    rs = make(num_slots=8, budget=50, chunk=32)
    for i in range(6):
        rs.add(seq(f"r{i}", 40, max_tokens=5))
    for _ in range(40):
        if not rs.has_work():
            break
        work = step(rs)
        assert sum(c.num_tokens for c in work) <= 50
        assert all(c.num_tokens <= 32 for c in work)
    assert_all_free(rs)


def test_decodes_come_first_and_prefill_gets_the_rest():
    rs = make(num_slots=8, budget=8, chunk=32)
    for i in range(3):
        rs.add(seq(f"d{i}", 2, max_tokens=10))
    step(rs)  # three 2-token prefills, each samples its first token
    assert all(not s.is_prefilling for s in rs.running)
    rs.add(seq("p", 100))
    work = step(rs)
    decodes = [c for c in work if c.num_tokens == 1 and c.sample]
    assert len(decodes) == 3
    prefill = [c for c in work if c.request_id == "p"]
    assert prefill and prefill[0].num_tokens == 8 - 3 and not prefill[0].sample


def test_allow_prefill_false_runs_decodes_only():
    rs = make()
    rs.add(seq("d", 4, max_tokens=10))
    step(rs)
    rs.add(seq("p", 40))
    work = step(rs, allow=False)
    assert [c.request_id for c in work] == ["d"]
    assert rs.outlook().prefillable and rs.outlook().ready_tokens == 32
    work = step(rs)  # p starts
    assert {c.request_id for c in work} == {"d", "p"}
    work = step(rs, allow=False)  # p is mid-prefill: not continued
    assert [c.request_id for c in work] == ["d"]


def test_slots_cap_running_sequences():
    rs = make(num_slots=2, budget=64)
    for i in range(5):
        rs.add(seq(f"r{i}", 3, max_tokens=3))
    for _ in range(30):
        if not rs.has_work():
            break
        step(rs)
        assert rs.num_running <= 2
    assert_all_free(rs)


def test_eos_stop_ids_and_ignore_eos():
    rs = make(eos=(2,))
    a = seq("eos", 3, max_tokens=10)
    b = seq("stopid", 3, max_tokens=10, stop_token_ids=(9,))
    c = seq("ignore", 3, max_tokens=3, ignore_eos=True)
    for s in (a, b, c):
        rs.add(s)
    step(rs)  # all prefilled
    assert rs.on_tokens(a, 2) and a.finish_reason == "stop"
    assert not rs.on_tokens(b, 5) and rs.on_tokens(b, 9) and b.finish_reason == "stop"
    assert not rs.on_tokens(c, 2) and c.output_token_ids == [7, 2]
    assert rs.on_tokens(c, 2) and c.finish_reason == "length"
    assert {s.request_id for s in rs.pop_finished()} == {"eos", "stopid", "ignore"}
    assert_all_free(rs)


def test_abort_and_fail_free_everything_in_any_state():
    rs = make(num_slots=2, chunk=8)
    seqs = [seq(f"r{i}", 20, max_tokens=5) for i in range(4)]
    for s in seqs:
        rs.add(s)
    work = rs.schedule()  # r0, r1 prefilling; r2, r3 waiting
    assert rs.abort("r1").finish_reason == "abort"  # running, mid-step
    assert rs.fail("r3").finish_reason == "error"   # waiting
    rs.on_step_done(work, {})  # r1's chunk is skipped
    rs.check_invariants()
    assert rs.abort("r1") is None and rs.abort("unknown") is None
    step(rs)
    rs.fail("r0")
    rs.abort("r2")
    assert_all_free(rs)
    assert [s.finish_reason for s in seqs] == ["error", "abort", "abort", "error"]


def test_finish_by_engine_stop_string():
    rs = make()
    s = seq("a", 3, max_tokens=10)
    rs.add(s)
    step(rs)
    rs.finish("a", "stop")
    assert s.finish_reason == "stop"
    assert_all_free(rs)


def test_prompt_bigger_than_cache_fails_on_add():
    rs = make(num_pages=4, page_tokens=16)
    s = seq("big", 65)
    rs.add(s)
    assert s.is_finished and s.finish_reason == "error"
    assert rs.pop_finished() == [s]
    assert_all_free(rs)


def test_sequence_outgrowing_the_whole_cache_fails_with_error():
    rs = make(num_pages=2, page_tokens=8, budget=16, chunk=16)
    s = seq("grow", 14, max_tokens=100, ignore_eos=True)
    rs.add(s)
    drain(rs)
    assert s.finish_reason == "error" and s.num_output_tokens == 16 - 14 + 1
    assert_all_free(rs)


def test_preemption_recomputes_newest_and_everyone_finishes():
    # 6 pages of 4 tokens: three 6-token prompts fit, their decodes do not.
    rs = make(num_slots=3, num_pages=6, page_tokens=4, budget=32, chunk=32)
    seqs = [seq(f"r{i}", 6, max_tokens=6, ignore_eos=True) for i in range(3)]
    for s in seqs:
        rs.add(s)
    drain(rs)
    assert rs.num_preemptions > 0
    assert seqs[0].num_preemptions == 0  # the oldest always progresses
    assert all(s.finish_reason == "length" and s.num_output_tokens == 6 for s in seqs)
    assert_all_free(rs)


def test_schedule_twice_and_missing_sample_are_errors():
    rs = make()
    rs.add(seq("a", 3))
    work = rs.schedule()
    with pytest.raises(RuntimeError):
        rs.schedule()
    with pytest.raises(KeyError, match="'a'"):
        rs.on_step_done(work, {})


def test_duplicate_request_id_and_bad_config():
    rs = make()
    rs.add(seq("a", 3))
    with pytest.raises(ValueError, match="already live"):
        rs.add(seq("a", 3))
    with pytest.raises(ValueError, match="num_slots"):
        RankConfig(num_slots=128, max_tokens_per_step=64).validate()


def test_outlook_reflects_capacity():
    rs = make(num_slots=1, chunk=32)
    assert not rs.outlook().prefillable
    rs.add(seq("a", 3, max_tokens=5))
    rs.add(seq("b", 40))
    o = rs.outlook()
    assert o.prefillable and o.ready_tokens == 3  # only one slot: b cannot start
    step(rs)
    o = rs.outlook()
    assert not o.prefillable and o.num_decodes == 1 and o.kv_usage > 0
    assert rs.pending_prefill_tokens == 40


def test_max_seq_len_rejects_long_prompts_and_stops_with_length():
    rs = RankScheduler(RankConfig(num_slots=2, num_pages=64, page_tokens=16,
                                  max_tokens_per_step=64, chunk_size=64, max_seq_len=20))
    long_prompt = seq("long", 21)
    ok = seq("ok", 15, max_tokens=100, ignore_eos=True)
    rs.add(long_prompt)
    rs.add(ok)
    assert long_prompt.finish_reason == "error"
    drain(rs)
    assert ok.finish_reason == "length" and ok.total_len == 20 and ok.num_output_tokens == 5
    assert_all_free(rs)


def _overlap(rs, tokens):
    """Drive `rs` as the engine's overlap loop does; `tokens[rid]` is what each step samples.
    -> {rid: number of chunks planned for it}."""
    planned, prev = {}, []
    while rs.has_work() or prev:
        work = rs.schedule()
        for c in work:
            planned[c.request_id] = planned.get(c.request_id, 0) + 1
        for c in prev:  # step N's tokens, read while step N+1 runs
            rs.resolve(c.seq, tokens[c.request_id])
        rs.on_step_done(work, {c.request_id: PENDING for c in work if c.sample})
        rs.check_invariants()
        prev = [c for c in work if c.sample]
    return planned


def test_a_pending_token_that_ends_by_length_gets_no_more_steps():
    """Overlap schedule: a sequence whose PENDING token ends it by length (max_tokens, the
    context limit) gets no more steps; one a stop token ends runs one extra step (README)."""
    rs = RankScheduler(RankConfig(num_slots=4, num_pages=64, page_tokens=16, max_tokens_per_step=64,
                                  chunk_size=64, max_seq_len=20), eos_token_ids=(2,))
    seqs = [Sequence("max", list(range(10, 20)), SamplingParams(max_tokens=3, ignore_eos=True)),
            Sequence("ctx", list(range(10, 27)), SamplingParams(max_tokens=100, ignore_eos=True)),
            Sequence("eos", list(range(10, 20)), SamplingParams(max_tokens=100))]
    for s in seqs:
        rs.add(s)
    planned = _overlap(rs, {"max": 7, "ctx": 7, "eos": 2})
    # one prefill, then a decode per token but the last (the pending one ends it by length)
    assert planned["max"] == 3 and seqs[0].output_token_ids == [7, 7, 7]
    assert planned["ctx"] == 3 and seqs[1].total_len == 20
    # EOS is read only after the next step was planned: that step's token is dropped
    assert planned["eos"] == 2 and seqs[2].output_token_ids == [2]
    assert [s.finish_reason for s in seqs] == ["length", "length", "stop"]
    assert rs.pages.num_free == rs.pages.num_pages and rs.slots.num_free == rs.slots.num_slots


def test_a_sequence_its_pending_token_ends_is_never_a_preemption_victim():
    """Overlap schedule: "b"'s PENDING token ends it by length, so its pages come back when that
    token resolves. "a" (older) needs a page while "b" holds the other one: "b" is not preempted
    (it would be counted and, given pages, recomputed for nothing); "a" waits one step."""
    rs = RankScheduler(RankConfig(num_slots=2, num_pages=2, page_tokens=4, max_tokens_per_step=16,
                                  chunk_size=16))
    a = Sequence("a", [10, 11, 12, 13], SamplingParams(max_tokens=3, ignore_eos=True))
    b = Sequence("b", [20, 21, 22, 23], SamplingParams(max_tokens=1, ignore_eos=True))
    rs.add(a)
    rs.add(b)
    planned = _overlap(rs, {"a": 7, "b": 8})
    assert rs.num_preemptions == 0 and b.num_preemptions == 0
    assert planned == {"a": 3, "b": 1}  # a: prefill + 2 decodes (its 3rd token ends it)
    assert (a.finish_reason, a.output_token_ids, b.finish_reason, b.output_token_ids) == \
        ("length", [7, 7, 7], "length", [8])
    assert_all_free(rs)
