"""Overlap schedule at one rank: a sequence whose PENDING token ends it by length (max_tokens,
the context limit) gets no more steps, one that a stop token ends runs one extra step whose
token is dropped (README, "Overlap schedule"); nothing leaks either way."""

from atom_jax.scheduler import PENDING, RankConfig, RankScheduler, SamplingParams, Sequence


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
