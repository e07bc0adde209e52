"""The host's per-step packing against per-token references (numpy only, no compile): the
vectorised `pack_chunks` and the decode fast paths of `Sequence.token_ids` and
`ChunkWork.token_states`."""

import numpy as np
import pytest

from atom_jax.cache import pack_chunks
from atom_jax.cache.batch import _cut_at
from atom_jax.scheduler import ChunkWork, SamplingParams, Sequence


def _reference(chunks, size, max_samples, split):
    """pack_chunks token by token, as its docstring states it."""
    regions = [(0, list(chunks))]
    if split:
        first, second = _cut_at(chunks, (sum(len(c[2]) for c in chunks) + 1) // 2)
        regions = [(0, first), (size // 2, second)]
    ref = {"ids": np.zeros(size), "pos": np.zeros(size), "slot": np.zeros(size), "valid": np.zeros(size, bool),
           "seg_start_idx": np.arange(size), "seg_start_pos": np.zeros(size), "seg_end_pos": np.zeros(size),
           "state": np.full(size, -1)}
    samples = []
    for base, region in regions:
        i = base
        for c in region:
            sl, start, toks = c[0], c[1], list(c[2])
            states = c[4] if len(c) > 4 and c[4] is not None else [-1] * len(toks)
            for k, tok in enumerate(toks):
                for key, v in (("ids", tok), ("pos", start + k), ("slot", sl), ("valid", True),
                               ("seg_start_idx", i - k), ("seg_start_pos", start),
                               ("seg_end_pos", start + len(toks)), ("state", states[k])):
                    ref[key][i] = v
                i += 1
            if c[3]:
                samples.append(i - 1)
    ref["sample_idx"] = np.array(samples + [0] * (max_samples - len(samples)))
    return ref, len(samples)


@pytest.mark.parametrize("split", [False, True])
def test_pack_chunks_matches_a_per_token_reference(split):
    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(1, 9))
        slots = rng.permutation(16)[:n]
        chunks = []
        for s in slots:
            length = int(rng.choice([1, 1, 1, int(rng.integers(2, 7))]))  # mostly decodes
            toks = rng.integers(-5, 1000, length)  # negative: a pending token's row
            toks = toks.astype(np.int32) if rng.random() < 0.3 else list(map(int, toks))
            states = None if rng.random() < 0.4 else list(map(int, rng.integers(-1, 9, length)))
            chunk = (int(s), int(rng.integers(0, 500)), toks, bool(rng.random() < 0.7))
            chunks.append(chunk + (states,) if rng.random() < 0.8 else chunk)
        size = 2 * (sum(len(c[2]) for c in chunks) + int(rng.integers(0, 4)))
        got = pack_chunks(chunks, size, 16, split=split)
        ref, ns = _reference(chunks, size, 16, split)
        assert got.num_samples == ns
        for key, want in ref.items():
            np.testing.assert_array_equal(getattr(got, key), want.astype(getattr(got, key).dtype), err_msg=key)


def test_decode_token_and_page_state_match_the_general_path():
    rng = np.random.default_rng()
    prompt = list(map(int, rng.integers(0, 100, 7)))
    seq = Sequence("r", prompt, SamplingParams())
    seq.output_token_ids += list(map(int, rng.integers(0, 100, 5)))
    every = prompt + seq.output_token_ids
    for start in range(len(every)):
        for num in (1, 2, 3):
            assert seq.token_ids(start, num) == every[start: start + num], (start, num)
    pt = 4
    for start in range(12):
        for num in (1, 3, 6):
            end = start + num
            entries = tuple(int(e) for e in rng.integers(-1, 9, (end - 1) // pt - start // pt + 1))
            want = [entries[p // pt - start // pt] for p in range(start, end)]
            assert ChunkWork(seq, start, num, True, page_states=entries).token_states(pt) == want
    assert ChunkWork(seq, 3, 1, True).token_states(pt) is None
