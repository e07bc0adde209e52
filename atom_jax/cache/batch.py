"""The packed, ragged token buffer one step processes on one rank.

Tokens of many sequences (decode tokens and prefill chunks) lie back to back; each token knows
its slot, its position and where its chunk starts and ends, so attention and the compressors
can tell tokens of the same chunk (read from the buffer) from earlier ones (read from the
cache). Padding tokens have valid=False and never write the cache."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass
class PackedBatch:
    ids: np.ndarray  # [T] int32
    pos: np.ndarray  # [T] int32
    slot: np.ndarray  # [T] int32
    valid: np.ndarray  # [T] bool
    seg_start_idx: np.ndarray  # [T] buffer index of this token's chunk start
    seg_start_pos: np.ndarray  # [T] position at the chunk start
    seg_end_pos: np.ndarray  # [T] position just past the chunk end
    state: np.ndarray  # [T] window-state entry of the token's page (prefix caching; -1: none)
    sample_idx: np.ndarray  # [S] buffer indices whose logits are wanted (padding: 0)
    num_samples: int  # real entries in sample_idx

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in TOKEN_KEYS + ("sample_idx",)}


# The per-token arrays of a PackedBatch, in the order `arrays()` and the runner's one host-to-device
# block lay them out.
TOKEN_KEYS = ("ids", "pos", "slot", "valid", "seg_start_idx", "seg_start_pos", "seg_end_pos", "state")


def pack_chunks(chunks, size: int, max_samples: int, split: bool = False) -> PackedBatch:
    """chunks: list of (slot, start_pos, token_ids, sample[, states]) -> a PackedBatch padded to
    `size`.

    `sample` marks chunks whose last token's logits are wanted; `states` (optional, one per
    token) the window-state entry of each token's page (prefix caching). With `split` (two-batch
    overlap) the real tokens are divided at half their count, cutting a chunk there if needed, and the
    second half starts at buffer index size // 2: the two micro-batches are [0, size/2) and
    [size/2, size), each padded, and no chunk straddles the middle."""
    regions = [(0, size, list(chunks))]
    if split:
        if size % 2:
            raise ValueError("a split buffer needs an even size")
        first, second = _cut_at(chunks, (sum(len(c[2]) for c in chunks) + 1) // 2)
        regions = [(0, size // 2, first), (size // 2, size // 2, second)]
    ids = np.zeros(size, np.int32)
    pos = np.zeros(size, np.int32)
    slot = np.zeros(size, np.int32)
    valid = np.zeros(size, bool)
    s_idx = np.arange(size, dtype=np.int32)  # padding: each its own empty "chunk"
    s_pos = np.zeros(size, np.int32)
    e_pos = np.zeros(size, np.int32)
    state = np.full(size, -1, np.int32)
    sample = np.zeros(max_samples, np.int32)
    ns = 0
    for base, cap, region in regions:  # vectorised over the region's chunks (the host's hot path)
        if not region:
            continue
        m = len(region)
        slots = [c[0] for c in region]
        if len(set(slots)) != m:  # the compressor sizes its work by this (max_windows)
            raise ValueError(f"a buffer (or TBO half) holds one chunk per slot; slots {slots}")
        toks = [c[2] for c in region]
        lens = np.fromiter(map(len, toks), np.int32, m)
        if not lens.all():  # the decode step keeps min(size, slots) sampling rows: one token each at least
            raise ValueError(f"a chunk holds no tokens (slots {[c[0] for c in region if not len(c[2])]})")
        n = int(lens.sum())
        if n > cap:
            raise ValueError(f"chunks hold more than {size} tokens")
        offs = base + np.cumsum(lens, dtype=np.int32) - lens  # each chunk's first buffer index
        starts = np.fromiter((c[1] for c in region), np.int32, m)
        sl_ = slice(base, base + n)
        # decode-sized chunks: one pass over every token (not an array per one-token chunk); long
        # (prefill) chunks: concatenated (fromiter walks a numpy chunk element by element: an 8K-token
        # array 0.36 ms vs 1.4 us)
        one_pass = n <= 2 * m
        ids[sl_] = (np.fromiter(itertools.chain.from_iterable(toks), np.int32, n) if one_pass
                    else np.concatenate([np.asarray(t, np.int32) for t in toks]))
        s_idx[sl_] = np.repeat(offs, lens)
        s_pos[sl_] = np.repeat(starts, lens)
        e_pos[sl_] = np.repeat(starts + lens, lens)
        pos[sl_] = s_pos[sl_] + np.arange(base, base + n, dtype=np.int32) - s_idx[sl_]
        slot[sl_] = np.repeat(np.asarray(slots, np.int32), lens)
        valid[sl_] = True
        want = np.fromiter((bool(c[3]) for c in region), bool, m)
        k = int(want.sum())
        if ns + k > max_samples:
            raise ValueError(f"more than {max_samples} sampling positions")
        sample[ns: ns + k] = (offs + lens - 1)[want]
        ns += k
        states = [chunk_states(c) for c in region]
        if any(st is not None for st in states):
            full = [np.full(len(t), -1, np.int32) if st is None else st for t, st in zip(toks, states)]
            state[sl_] = (np.fromiter(itertools.chain.from_iterable(full), np.int32, n) if one_pass
                          else np.concatenate([np.asarray(st, np.int32) for st in full]))
    return PackedBatch(ids, pos, slot, valid, s_idx, s_pos, e_pos, state, sample, ns)


def chunk_states(chunk):
    """A chunk's optional 5th field: its tokens' window-state entries (None: none kept)."""
    return chunk[4] if len(chunk) > 4 else None


def _cut_at(chunks, n_first: int):
    """Split the chunk list after n_first tokens; a chunk cut in two samples only in its 2nd part."""
    first, second, seen = [], [], 0
    for chunk in chunks:
        sl, start, toks, want, *states = chunk
        n = len(toks)
        if seen >= n_first:
            second.append(chunk)
        elif seen + n <= n_first:
            first.append(chunk)
        else:
            k = n_first - seen
            st = states[0] if states else None
            first.append((sl, start, toks[:k], False, None if st is None else st[:k]))
            second.append((sl, start + k, toks[k:], want, None if st is None else st[k:]))
        seen += n
    return first, second
