"""Step plans as fixed-shape int32 arrays, shipped from process 0 with
`jax.experimental.multihost_utils.broadcast_one_to_all` (a psum over every device of every
process: the same collectives the model step uses, no other transport).

A message is a header plus an inline part whose size every process computes from the engine
configuration, so the common step is one broadcast of one shape. A larger plan (long prefill
chunks, many page-table rows) sends the rest in a second broadcast whose size, announced in
the header, is rounded up to a power of two (few shapes, each compiled once).

Layout of the payload of a STEP message (all int32; floats and uint32 by bit pattern):
    per rank: n_chunks, then n_chunks x (slot, start_pos, n_tokens, sample, has_states)
    all chunks' token ids, in order, then the window-state entries of those with has_states
    n_page_rows, then per row: rank, slot, n_pages, pages...
    n_restores, then per restore: rank, slot, start_pos, n_entries, entries...
    sampling: rows[n], temperature[n], top_k[n], top_p[n], seed[n], counter[n]
"""

from __future__ import annotations

import numpy as np

from atom_jax.cache.batch import chunk_states
from atom_jax.engine.runner import SamplingRows, StepInputs

MAGIC = 0x41544A58  # "ATJX"
STEP, NOOP, STOP = 1, 2, 3
KINDS = {STEP: "step", NOOP: "keepalive", STOP: "stop"}
HEADER = 8  # magic, kind, seq, payload_len, bucket, tbo, dp, n_samples


class ChannelError(RuntimeError):
    """A received message is not what this process expected (processes out of step)."""


def inline_capacity(dp: int, num_slots: int, max_tokens_per_step: int) -> int:
    """Payload ints sent with the header: a step of full buckets with every slot sampling and
    a few page-table rows fits; rarer bigger plans take a second broadcast."""
    chunks = dp * (1 + 5 * num_slots)
    tokens = 2 * dp * max_tokens_per_step  # token ids and their pages' state entries
    sampling = 6 * dp * num_slots
    page_rows = 1 + dp * 2 * (3 + 8)
    restores = 1 + dp * 2 * 5
    return max(1024, chunks + tokens + sampling + page_rows + restores)


def encode_step(inputs: StepInputs) -> tuple[np.ndarray, dict]:
    """-> (payload int32, header fields)."""
    parts = []
    for rank_chunks in inputs.chunks:
        parts.append([len(rank_chunks)])
        for c in rank_chunks:
            slot, start, toks, sample = c[:4]
            parts.append([slot, start, len(toks), int(bool(sample)), int(chunk_states(c) is not None)])
    parts.extend(np.asarray(c[2], np.int32) for rank_chunks in inputs.chunks for c in rank_chunks)
    parts.extend(np.asarray(chunk_states(c), np.int32) for rank_chunks in inputs.chunks for c in rank_chunks
                 if chunk_states(c) is not None)
    parts.append([len(inputs.page_rows)])
    for r, slot, pages in inputs.page_rows:
        parts.append([r, slot, len(pages)])
        parts.append(np.asarray(pages, np.int32))
    parts.append([len(inputs.restores)])
    for r, slot, start, entries in inputs.restores:
        parts.append([r, slot, start, len(entries)])
        parts.append(np.asarray(entries, np.int32))
    s = inputs.sampling
    parts.extend([s.rows.astype(np.int32), s.temperature.astype(np.float32).view(np.int32),
                  s.top_k.astype(np.int32), s.top_p.astype(np.float32).view(np.int32),
                  s.seed.astype(np.uint32).view(np.int32), s.counter.astype(np.uint32).view(np.int32)])
    payload = np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in parts])
    return payload, {"bucket": inputs.bucket, "tbo": int(inputs.tbo), "dp": len(inputs.chunks),
                     "n_samples": len(s.rows)}


def decode_step(payload: np.ndarray, bucket: int, tbo: bool, dp: int, n_samples: int) -> StepInputs:
    p = np.asarray(payload, np.int32)
    at = 0

    def take(n):
        nonlocal at
        if at + n > len(p):
            raise ChannelError(f"step payload ends early ({len(p)} ints)")
        out = p[at: at + n]
        at += n
        return out

    heads = []
    for _ in range(dp):
        (n_chunks,) = take(1)
        heads.append([tuple(int(v) for v in take(5)) for _ in range(n_chunks)])
    chunks = [[(slot, start, take(n).copy(), bool(sample)) for slot, start, n, sample, _ in rank_heads]
              for rank_heads in heads]
    chunks = [[c + ((take(len(c[2])).copy() if h[4] else None),) for c, h in zip(rank_chunks, rank_heads)]
              for rank_chunks, rank_heads in zip(chunks, heads)]
    (n_rows,) = take(1)
    page_rows = []
    for _ in range(n_rows):
        r, slot, n = (int(v) for v in take(3))
        page_rows.append((r, slot, take(n).copy()))
    (n_restores,) = take(1)
    restores = []
    for _ in range(n_restores):
        r, slot, start, n = (int(v) for v in take(4))
        restores.append((r, slot, start, tuple(int(v) for v in take(n))))
    n = n_samples
    sampling = SamplingRows(rows=take(n).copy(), temperature=take(n).view(np.float32).copy(),
                            top_k=take(n).copy(), top_p=take(n).view(np.float32).copy(),
                            seed=take(n).view(np.uint32).copy(), counter=take(n).view(np.uint32).copy())
    if at != len(p):
        raise ChannelError(f"step payload has {len(p) - at} trailing ints")
    return StepInputs(bucket, bool(tbo), chunks, page_rows, sampling, restores)


def _rest_size(n: int) -> int:
    return max(1024, 1 << (n - 1).bit_length())


class PlanChannel:
    """Process 0 sends, every other process receives, in the same order: each message is one
    or two collective broadcasts that every process enters."""

    def __init__(self, dp: int, capacity: int, is_source: bool, broadcast=None):
        self.dp, self.capacity, self.is_source = dp, capacity, is_source
        if broadcast is None:
            from jax.experimental.multihost_utils import broadcast_one_to_all

            broadcast = broadcast_one_to_all
        self._broadcast = broadcast
        self.seq = 0  # messages sent / received so far

    def send(self, kind: int, inputs: StepInputs | None = None) -> None:
        assert self.is_source
        payload, fields = encode_step(inputs) if kind == STEP else (np.zeros(0, np.int32), {})
        msg = np.zeros(HEADER + self.capacity, np.int32)
        msg[:HEADER] = [MAGIC, kind, self.seq, len(payload), fields.get("bucket", 0), fields.get("tbo", 0),
                        fields.get("dp", self.dp), fields.get("n_samples", 0)]
        inline = payload[: self.capacity]
        msg[HEADER: HEADER + len(inline)] = inline
        self._broadcast(msg)
        if len(payload) > self.capacity:
            rest = np.zeros(_rest_size(len(payload) - self.capacity), np.int32)
            rest[: len(payload) - self.capacity] = payload[self.capacity:]
            self._broadcast(rest)
        self.seq += 1

    def recv(self) -> tuple[int, StepInputs | None]:
        """-> (kind, inputs for STEP else None)."""
        assert not self.is_source
        msg = np.asarray(self._broadcast(np.zeros(HEADER + self.capacity, np.int32)))
        magic, kind, seq, length, bucket, tbo, dp, n_samples = (int(v) for v in msg[:HEADER])
        if magic != MAGIC or kind not in KINDS:
            raise ChannelError(f"not a plan message (magic {magic:#x}, kind {kind})")
        if seq != self.seq:
            raise ChannelError(f"expected message {self.seq}, got {seq}: processes are out of step")
        if dp != self.dp:
            raise ChannelError(f"process 0 runs dp={dp}, this process dp={self.dp}")
        self.seq += 1
        if kind != STEP:
            return kind, None
        payload = msg[HEADER: HEADER + min(length, self.capacity)]
        if length > self.capacity:
            rest = np.asarray(self._broadcast(np.zeros(_rest_size(length - self.capacity), np.int32)))
            payload = np.concatenate([payload, rest[: length - self.capacity]])
        return STEP, decode_step(payload, bucket, bool(tbo), dp, n_samples)
