"""The packed, ragged token buffer one step processes on one rank.

Tokens of many sequences (decode tokens and prefill chunks) lie back to back; each token knows
its slot, its position and where its chunk starts and ends, so attention and the compressors
can tell tokens of the same chunk (read from the buffer) from earlier ones (read from the
cache). Padding tokens have valid=False and never write the cache."""

from __future__ import annotations

import dataclasses

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
    sample_idx: np.ndarray  # [S] buffer indices whose logits are wanted (padding: 0)
    num_samples: int  # real entries in sample_idx

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in
                ("ids", "pos", "slot", "valid", "seg_start_idx", "seg_start_pos", "seg_end_pos", "sample_idx")}


def pack_chunks(chunks, size: int, max_samples: int, split: bool = False) -> PackedBatch:
    """chunks: list of (slot, start_pos, token_ids, sample) -> a PackedBatch padded to `size`.

    `sample` marks chunks whose last token's logits are wanted. With `split` (two-batch overlap)
    the real tokens are divided at half their count, cutting a chunk there if needed, and the
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
    sample = np.zeros(max_samples, np.int32)
    ns = 0
    for base, cap, region in regions:
        off = base
        slots = [c[0] for c in region]
        if len(set(slots)) != len(slots):  # the compressor sizes its work by this (max_windows)
            raise ValueError(f"a buffer (or TBO half) holds one chunk per slot; slots {slots}")
        for sl, start, toks, want in region:
            n = len(toks)
            if off + n > base + cap:
                raise ValueError(f"chunks hold more than {size} tokens")
            sl_ = slice(off, off + n)
            ids[sl_], pos[sl_], slot[sl_], valid[sl_] = toks, start + np.arange(n), sl, True
            s_idx[sl_], s_pos[sl_], e_pos[sl_] = off, start, start + n
            if want:
                if ns >= max_samples:
                    raise ValueError(f"more than {max_samples} sampling positions")
                sample[ns] = off + n - 1
                ns += 1
            off += n
    return PackedBatch(ids, pos, slot, valid, s_idx, s_pos, e_pos, sample, ns)


def _cut_at(chunks, n_first: int):
    """Split the chunk list after n_first tokens; a chunk cut in two samples only in its 2nd part."""
    first, second, seen = [], [], 0
    for sl, start, toks, want in chunks:
        n = len(toks)
        if seen >= n_first:
            second.append((sl, start, toks, want))
        elif seen + n <= n_first:
            first.append((sl, start, toks, want))
        else:
            k = n_first - seen
            first.append((sl, start, toks[:k], False))
            second.append((sl, start + k, toks[k:], want))
        seen += n
    return first, second
