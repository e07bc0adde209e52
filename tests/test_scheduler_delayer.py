"""Prefill gate decision tables: off, on (PrefillDelayer) and coalesce."""

import pytest

from atom_jax.scheduler import (NoDelayer, PrefillCoalescer, PrefillDelayer, PrefillOutlook,
                                make_delayer)

BUDGET = 100


def o(prefillable, usage=0.5, ready=None, decodes=4):
    ready = (50 if prefillable else 0) if ready is None else ready
    return PrefillOutlook(prefillable, ready, decodes, usage, BUDGET)


ALL = [o(True), o(True), o(True)]
NONE = [o(False), o(False), o(False)]
MIXED = [o(True), o(False), o(False)]


def decisions(gate, seq):
    return [(d.allow, d.outcome) for d in map(gate.decide, seq)]


def test_off_always_allows():
    assert decisions(NoDelayer(), [MIXED, ALL, NONE]) == [(True, "allow")] * 3


def test_delayer_all_and_none_allow_mixed_delays():
    d = PrefillDelayer(max_delay_passes=30)
    d.decide(NONE)  # first tick
    assert decisions(d, [ALL, NONE, MIXED]) == [(True, "allow"), (True, "allow"),
                                                 (False, "delay")]


def test_delayer_leaves_out_ranks_with_no_work():
    """A rank that neither prefills nor decodes is padding either way: a lone prefillable rank
    beside idle ones is allowed; beside one that decodes, it waits."""
    d = PrefillDelayer(max_delay_passes=30)
    d.decide(NONE)  # first tick
    lone = [o(True, decodes=0), o(False, decodes=0), o(False, decodes=0)]
    beside_decodes = [o(True, decodes=0), o(False, decodes=0), o(False, decodes=2)]
    assert decisions(d, [lone, beside_decodes]) == [(True, "allow"), (False, "delay")]
    assert d.decide(lone).state == "mixed"  # (reported as it is across all ranks)


def test_delayer_first_tick_is_allowed_even_when_mixed():
    d = PrefillDelayer()
    assert decisions(d, [MIXED, MIXED]) == [(True, "allow"), (False, "delay")]


@pytest.mark.parametrize("n", [0, 1, 3, 30])
def test_delayer_times_out_after_exactly_max_delay_passes(n):
    d = PrefillDelayer(max_delay_passes=n)
    d.decide(NONE)
    out = decisions(d, [MIXED] * (n + 2))
    assert out[:n] == [(False, "delay")] * n
    assert out[n] == (True, "timeout")
    # the count restarts after a timeout
    assert out[n + 1] == ((False, "delay") if n else (True, "timeout"))


def test_delayer_wait_ends_when_all_ranks_become_ready():
    d = PrefillDelayer(max_delay_passes=30)
    d.decide(NONE)
    for _ in range(5):
        assert not d.decide(MIXED).allow
    dec = d.decide(ALL)
    assert dec.allow and dec.outcome == "allow" and dec.waited == 5
    assert d.decide(MIXED).waited == 1  # a new wait starts from zero


def test_delayer_low_watermark_forces_allow_only_for_a_ready_rank():
    d = PrefillDelayer(max_delay_passes=30, low_watermark=0.1)
    d.decide(NONE)
    assert decisions(d, [[o(True, usage=0.05), o(False)]]) == [(True, "watermark")]
    # an idle, empty rank that cannot prefill does not force anything
    assert decisions(d, [[o(True, usage=0.5), o(False, usage=0.0)]]) == [(False, "delay")]


def test_coalescer_fires_at_target_fill():
    c = PrefillCoalescer(target_fraction=0.5, max_wait_ticks=10)
    c.decide(NONE)
    under = [o(True, ready=40), o(False), o(True, ready=100)]   # 140 / 300
    enough = [o(True, ready=40), o(True, ready=20), o(True, ready=100)]  # 160 / 300
    assert decisions(c, [under, enough, NONE]) == [(False, "delay"), (True, "allow"),
                                                    (True, "allow")]


def test_coalescer_exits_stall_timeout_watermark():
    c = PrefillCoalescer(target_fraction=0.9, max_wait_ticks=2, high_watermark=0.8)
    c.decide(NONE)
    low = [o(True, ready=10), o(False)]
    assert decisions(c, [low, low, low]) == [(False, "delay"), (False, "delay"),
                                              (True, "timeout")]
    stalled = [o(True, ready=10, decodes=0), o(False, decodes=0)]
    assert decisions(c, [stalled]) == [(True, "stall")]
    full = [o(True, ready=10, usage=0.85), o(False)]
    assert decisions(c, [full]) == [(True, "watermark")]
    # the watermark is off by default
    c2 = PrefillCoalescer(target_fraction=0.9)
    c2.decide(NONE)
    assert decisions(c2, [full]) == [(False, "delay")]


def test_coalescer_first_tick_allowed():
    c = PrefillCoalescer(target_fraction=0.9)
    assert decisions(c, [[o(True, ready=1)], [o(True, ready=1)]]) == [(True, "allow"),
                                                                       (False, "delay")]


def test_make_delayer_modes():
    assert isinstance(make_delayer("off"), NoDelayer)
    d = make_delayer("on", max_delay_passes=7, low_watermark=0.2)
    assert isinstance(d, PrefillDelayer) and d.max_delay_passes == 7 and d.low_watermark == 0.2
    assert isinstance(make_delayer("coalesce", target_fraction=0.6), PrefillCoalescer)
    with pytest.raises(ValueError, match="mode"):
        make_delayer("sometimes")
    with pytest.raises(ValueError):
        PrefillCoalescer(target_fraction=0.0)


def test_decisions_are_deterministic_across_hosts():
    import random
    rng = random.Random(0)
    stream = [[o(rng.random() < 0.5, usage=rng.random()) for _ in range(4)] for _ in range(200)]
    for mode in ("on", "coalesce"):
        a, b = make_delayer(mode, low_watermark=0.05), make_delayer(mode, low_watermark=0.05)
        assert decisions(a, stream) == decisions(b, stream)
