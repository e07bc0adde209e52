"""SamplingParams validation, Sequence bookkeeping, page and slot allocators."""

import random

import numpy as np
import pytest

from atom_jax.scheduler import PageAllocator, SamplingParams, Sequence, SlotAllocator, pages_for
from atom_jax.scheduler.validation import (InvalidRequest, _bad_token_ids, _token_ids_ok_fast, check_request,
                                           check_token_ids)


def test_sampling_defaults_validate():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (16, 0.0, 1.0, 0)
    assert p.seed is None and p.stop_token_ids == () and p.stop == ()
    assert not p.ignore_eos and not p.logprobs and p.greedy


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e308), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=100_000_000_000), "top_k"),  # beyond the sampler's int32
    (dict(seed="x"), "seed"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=(True,)), "stop_token_ids"),
    (dict(stop=("",)), "stop"),
    (dict(stop=("a\ud800",)), "stop"),  # a lone surrogate cannot be matched or echoed
    (dict(stop=["s"] * 17), "stop"),
    (dict(logprobs=1), "logprobs"),
])
def test_sampling_rejects_bad_values(kwargs, field):
    """Building a SamplingParams validates it (once: nothing downstream checks it again)."""
    with pytest.raises(InvalidRequest, match=field) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field


def test_sampling_normalises_off_values_and_seeds():
    p = SamplingParams(top_k=-1, temperature=1, seed=2**40 + 7)
    assert p.top_k == 0 and isinstance(p.temperature, float) and p.seed == 7
    assert SamplingParams(seed=-1).seed == 2**32 - 1


def test_check_request_needs_the_model():
    p = SamplingParams(max_tokens=10, stop_token_ids=(3,))
    check_request(5, p, vocab_size=8, max_context=15)
    for args, param in [((5, SamplingParams(stop_token_ids=(8,)), 8, 100), "stop_token_ids"),
                        ((15, p, 8, 15), "prompt"), ((6, p, 8, 15), "max_tokens")]:
        with pytest.raises(InvalidRequest) as e:
            check_request(*args)
        assert e.value.param == param


def test_check_token_ids_fast_and_per_element_paths_agree():
    """A long list of plain ints takes the numpy bounds check; anything else the per-element one.
    Both accept and reject the same lists, and the error names the first bad ids."""
    rng = random.Random()
    vocab = rng.randrange(50, 5000)
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1000, 4000))]
    check_token_ids("prompt", ids, vocab)
    check_token_ids("prompt", [], vocab)
    check_token_ids("prompt", (0, vocab - 1), vocab)  # a tuple, at both bounds
    i = rng.randrange(len(ids))
    for bad, shown in [(vocab, str(vocab)), (-1, "-1"), (2**70, str(2**70)), (True, "True"), (1.0, "1.0"), ("7", "'7'"),
                       (np.int64(3), "(3)")]:
        with pytest.raises(InvalidRequest, match="out of range") as e:
            check_token_ids("prompt", ids[:i] + [bad] + ids[i:], vocab)
        assert e.value.param == "prompt" and e.value.code == "token_id_out_of_range" and shown in str(e.value)


class _Id(int):  # an int subclass: an int to the per-element check, unknown to the fast path
    pass


def _with(ids, pos, value):
    return ids[:pos] + [value] + ids[pos + 1:]


_VOCAB = 300
_BASE = [i % _VOCAB for i in range(7, 7 + 2 * _VOCAB)]  # holds 0 and 1 (at 293, 294, 593, 594)
_LONG = list(map(int, np.random.default_rng(0).integers(0, _VOCAB, 131072)))
_LONG_ONE = _LONG.index(1)


@pytest.mark.parametrize("ids, vocab, ok", [
    (_BASE, _VOCAB, True),
    (tuple(_BASE), _VOCAB, True),
    ([], _VOCAB, True),
    ([5], _VOCAB, True),
    (_LONG, _VOCAB, True),
    ([2**31 + 5] * 200, 2**40, True),  # past int32 (and the fast path's view): an int all the same
    (_with(_BASE, 10, 2**70), 2**80, True),  # past int64 too
    (_with(_BASE, 3, _Id(4)), _VOCAB, True),
    (_with(_BASE, 293, False), _VOCAB, False),  # a bool where the id was 0
    (_with(_BASE, 294, True), _VOCAB, False),  # and where it was 1
    (_with(_BASE, 0, True), _VOCAB, False),
    (_with(_BASE, 599, False), _VOCAB, False),
    ([True] * 200, _VOCAB, False),
    (_with(_LONG, _LONG_ONE, True), _VOCAB, False),  # one bool in a 128K-token prompt
    (_with(_BASE, 10, 1.0), _VOCAB, False),
    (_with(_BASE, 10, 2**70), _VOCAB, False),
    (_with(_BASE, 10, -1), _VOCAB, False),
    (_with(_BASE, 10, -(2**31)), _VOCAB, False),
    (_with(_BASE, 10, _VOCAB), _VOCAB, False),
    (_with(_BASE, 10, np.int64(3)), _VOCAB, False),  # numpy scalars are not ints here
    (_with(_BASE, 10, np.int32(3)), _VOCAB, False),
    (_with(_BASE, 10, np.bool_(True)), _VOCAB, False),
    (_with(_BASE, 10, None), _VOCAB, False),
    (_with(_BASE, 10, "3"), _VOCAB, False),
    (_with(_BASE, 10, [3]), _VOCAB, False),
])
def test_check_token_ids_paths_agree_on_edge_cases(ids, vocab, ok):
    """The fast path accepts only what the per-element check accepts, and accepts lists of plain
    ints in range (those are what it is for); check_token_ids follows the per-element check."""
    fast = _token_ids_ok_fast(ids, vocab)
    assert (not _bad_token_ids(ids, vocab)) == ok
    assert fast <= ok
    if ok and all(type(t) is int and t < 2**31 for t in ids):
        assert fast
    if ok:
        check_token_ids("prompt", ids, vocab)
    else:
        with pytest.raises(InvalidRequest, match="out of range"):
            check_token_ids("prompt", ids, vocab)


def test_sampling_normalises_lists_and_single_stop_string():
    p = SamplingParams(stop_token_ids=[3, 4], stop="END")
    assert p.stop_token_ids == (3, 4) and p.stop == ("END",)
    hash(p)


def test_sequence_lengths_and_prefill_state():
    s = Sequence("a", [5, 6, 7, 8])
    assert s.total_len == 4 and s.num_uncomputed == 4
    assert s.is_prefilling and s.remaining_prefill_tokens == 4
    s.num_computed = 4
    s.output_token_ids.append(9)
    assert not s.is_prefilling and s.remaining_prefill_tokens == 0 and s.num_uncomputed == 1
    assert s.token_ids(2, 3) == [7, 8, 9] and s.token_ids(4, 1) == [9]
    # After preemption the whole history is recomputed as one prefill.
    s.num_computed = 0
    assert s.is_prefilling and s.remaining_prefill_tokens == 5
    with pytest.raises(ValueError):
        Sequence("empty", [])


def test_pages_for_is_ceil():
    assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_page_allocator_allocate_extend_free():
    pa = PageAllocator(num_pages=8, page_tokens=4)
    table = pa.allocate(5)
    assert len(table) == 2 and pa.num_free == 6 and pa.usage == pytest.approx(0.25)
    assert pa.extend(table, 8) and len(table) == 2  # still fits
    assert pa.extend(table, 9) and len(table) == 3
    assert not pa.extend(table, 100) and len(table) == 3  # too big: unchanged
    other = pa.allocate(20)
    assert pa.num_free == 0 and pa.usage == 1.0
    with pytest.raises(MemoryError):
        pa.allocate(1)
    pa.free(table)
    pa.free(other)
    assert pa.num_free == 8 and pa.usage == 0.0


def test_page_allocator_double_free_is_an_error():
    pa = PageAllocator(4, 16)
    t = pa.allocate(16)
    pa.free(t)
    with pytest.raises(ValueError, match="already free"):
        pa.free(t)
    with pytest.raises(ValueError, match="out of range"):
        pa.free([99])
    t = pa.allocate(32)
    with pytest.raises(ValueError, match="twice"):
        pa.free([t[0], t[0]])


def test_slot_allocator():
    sa = SlotAllocator(2)
    a, b = sa.allocate(), sa.allocate()
    assert {a, b} == {0, 1} and sa.allocate() is None and sa.num_free == 0
    sa.free(a)
    with pytest.raises(ValueError):
        sa.free(a)
    assert sa.allocate() == a


def test_allocators_reject_bad_sizes():
    with pytest.raises(ValueError):
        PageAllocator(0, 4)
    with pytest.raises(ValueError):
        PageAllocator(4, 0)
    with pytest.raises(ValueError):
        SlotAllocator(0)
