"""The overlap schedule (step N+1 dispatched before step N's tokens are read) gives the same
outputs as the synchronous loop, its oracle: greedy and seeded sampling, stop strings,
stop_token_ids, EOS, max_tokens, an abort mid-flight, preemption and a failing step, dp 1 and 2
(dp 2 with TBO), with and without the dispatch thread; no page or slot leaks. One engine per dp
runs every mode (the same compiled programs), toggling `config.overlap_schedule` and
`config.dispatch_thread` between runs."""

from __future__ import annotations

import numpy as np
import pytest

from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.scheduler import PENDING

# tight pages (3 per rank; a long sequence needs all 3) so requests preempt each other
SMALL = dict(num_slots=4, num_pages=3, page_tokens=32, max_pages_per_seq=3, max_tokens_per_step=32,
             chunk_size=16, buckets=(8, 32))


def _prompt(rng, n):
    return [int(t) for t in rng.integers(32, 127, size=n)]  # printable bytes of the byte tokenizer


def _run(eng, requests, abort_after: dict, fail_at: dict):
    """Run `requests` [(id, prompt ids, params)] to the end. `abort_after[id] = k`: abort once an
    output shows k tokens; `fail_at[id] = k`: the step that feeds id's k-th output token fails.
    -> {id: [output, ...]} in arrival order per request."""
    real = eng.runner.host_inputs

    def flaky(plan):
        for work in plan.per_rank:
            for c in work:
                k = fail_at.get(c.request_id)
                if k is not None and c.start_pos == c.seq.num_prompt_tokens + k - 1 and c.num_tokens == 1:
                    raise RuntimeError("device fell over")
        return real(plan)

    eng.runner.host_inputs = flaky
    try:
        for rid, ids, params in requests:
            eng.add_request(prompt_token_ids=ids, params=params, request_id=rid)
        streams: dict[str, list] = {rid: [] for rid, _, _ in requests}
        while eng.has_unfinished():
            for o in eng.step():
                assert PENDING not in o.token_ids, o
                streams[o.request_id].append(o)
                k = abort_after.get(o.request_id)
                if k is not None and len(o.token_ids) >= k and not o.finished:
                    eng.abort(o.request_id)
    finally:
        del eng.runner.host_inputs
    return streams


@pytest.mark.parametrize("dp,tbo", [(1, False), (2, True)])
def test_overlap_outputs_equal_the_synchronous_loop(dp, tbo):
    eng = Engine(EngineConfig(dp=dp, tbo=tbo, **SMALL))  # the embedded tiny model, byte tokenizer
    rng = np.random.default_rng()
    # probe (synchronous): pick a stop string, a stop token and an EOS token the model emits
    eng.config.overlap_schedule = False
    probe = eng.generate([_prompt(rng, 9), _prompt(rng, 12)], SamplingParams(max_tokens=12, ignore_eos=True))
    stop_text = probe[0].text[4:6] if len(probe[0].text) >= 6 else probe[0].text[-1:]
    stop_id, eos_id = probe[1].token_ids[5], probe[1].token_ids[3]
    for r in eng.scheduler.ranks:  # the engine-wide EOS ids: one the model emits here
        r.eos_token_ids = frozenset({eos_id})

    requests = [  # the oldest runs first and is never preempted: the abort hits a fixed step
        ("abort", _prompt(rng, 20), SamplingParams(max_tokens=20, ignore_eos=True)),
        ("long", _prompt(rng, 60), SamplingParams(max_tokens=35, temperature=0.7, seed=5, ignore_eos=True)),
        ("greedy", _prompt(rng, 30), SamplingParams(max_tokens=40, ignore_eos=True, logprobs=True)),
        ("seeded", _prompt(rng, 25), SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50,
                                                    seed=11, ignore_eos=True)),
        ("stop_str", probe[0].prompt_token_ids, SamplingParams(max_tokens=12, stop=[stop_text], ignore_eos=True)),
        ("stop_id", probe[1].prompt_token_ids, SamplingParams(max_tokens=12, stop_token_ids=[stop_id],
                                                              ignore_eos=True)),
        ("eos", probe[1].prompt_token_ids, SamplingParams(max_tokens=12)),
        ("short", _prompt(rng, 5), SamplingParams(max_tokens=1)),
    ]
    # a failing step fails every request in it: its own small batch
    failing = [("fails", _prompt(rng, 14), SamplingParams(max_tokens=20, ignore_eos=True)),
               ("after", _prompt(rng, 40), SamplingParams(max_tokens=6, ignore_eos=True))]
    runs = {}
    for mode in ("off", "on", "thread"):  # thread: the overlap schedule with the dispatch thread
        eng.config.overlap_schedule, eng.config.dispatch_thread = mode != "off", mode == "thread"
        before = sum(r.num_preemptions for r in eng.scheduler.ranks)
        runs[mode] = _run(eng, requests, abort_after={"abort": 3}, fail_at={})
        assert sum(r.num_preemptions for r in eng.scheduler.ranks) > before, "the scenario should preempt"
        runs[mode].update(_run(eng, failing, abort_after={}, fail_at={"fails": 4}))
        # nothing leaks: every page and slot is free again
        assert [(r.pages.num_free, r.slots.num_free) for r in eng.scheduler.ranks] == \
            [(SMALL["num_pages"], SMALL["num_slots"])] * dp
        eng.scheduler.check_invariants()

    sync = runs["off"]
    finals = {rid: s[-1] for rid, s in sync.items()}
    assert finals["greedy"].finish_reason == "length" and len(finals["greedy"].token_ids) == 40
    assert len(finals["greedy"].logprobs) == 40 and not finals["seeded"].logprobs
    assert finals["stop_str"].finish_reason == "stop" and stop_text not in finals["stop_str"].text
    assert finals["stop_id"].finish_reason == "stop" and finals["stop_id"].token_ids[-1] == stop_id
    assert finals["eos"].finish_reason == "stop" and finals["eos"].token_ids[-1] == eos_id
    assert finals["abort"].finish_reason == "abort" and len(finals["abort"].token_ids) == 3
    assert finals["fails"].finish_reason == "error" and len(finals["fails"].token_ids) == 4
    for rid, mode in ((rid, mode) for rid in sync for mode in ("on", "thread")):
        a, b = sync[rid], runs[mode][rid]
        assert [(o.new_token_ids, o.delta_text, o.finished, o.finish_reason) for o in a] == \
               [(o.new_token_ids, o.delta_text, o.finished, o.finish_reason) for o in b], (rid, mode)
        assert a[-1].token_ids == b[-1].token_ids and a[-1].text == b[-1].text, (rid, mode)
        np.testing.assert_allclose(a[-1].logprobs, b[-1].logprobs, rtol=1e-4, atol=1e-4)
