"""A step that fails after the overlap schedule planned past it (dispatch thread) must leave
nothing behind in the prefix cache: its pages' KV was never written, so a later request with the
same prompt computes it again, and one that reused them meanwhile fails (it read garbage)."""

from __future__ import annotations

import numpy as np

from atom_jax.engine import Engine, EngineConfig, SamplingParams


def test_pages_of_a_failed_step_are_not_reused_by_the_prefix_cache():
    # A's 64 tokens fill the first step (4 full pages, registered when it is dispatched); B
    # (A's first 48 tokens, then its own) is admitted in the second step onto 3 of them, before
    # the first step's failure is read
    eng = Engine(EngineConfig(num_slots=2, num_pages=16, page_tokens=16, max_pages_per_seq=8,
                              max_tokens_per_step=64, chunk_size=64, buckets=(64,), dispatch_thread=True,
                              enable_prefix_caching=True))
    rng = np.random.default_rng()
    a = list(map(int, rng.integers(0, 256, 64)))
    b = a[:48] + list(map(int, rng.integers(0, 256, 20)))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    real, calls = eng.runner.run, []

    def flaky(inputs):  # on the dispatch thread: the first launch fails
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("launch fell over")
        return real(inputs)

    eng.runner.run = flaky
    try:
        outs = eng.generate([a, b], params)
    finally:
        del eng.runner.run
    assert [o.finish_reason for o in outs] == ["error", "error"], outs
    assert all("launch fell over" in o.error for o in outs)
    eng.scheduler.check_invariants()
    assert [(r.pages.num_free, r.pages.num_cached) for r in eng.scheduler.ranks] == [(16, 0)]
    got = eng.generate([a], params)[0]
    assert got.num_cached_tokens == 0, got  # nothing of the failed step is offered for reuse
    eng.close()
    eng.reset_scheduler()  # the oracle: a fresh cache, the synchronous loop
    eng.config.overlap_schedule = False
    assert eng.generate([a], params)[0].token_ids == got.token_ids
