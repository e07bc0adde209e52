"""Token-balanced two-batch split of one rank's [rows, seq] token block.

The cut is at total // 2 tokens, inside a row when needed (that row's second half then treats
the first half as its prefix). Every rank has the same block shape, so every rank cuts at the
same place and the two chains' collectives line up across ranks."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows [row0, row0 + rows), columns [start, start + length) of the rank's block."""

    row0: int
    rows: int
    start: int
    length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def split_two(rows: int, seq: int) -> tuple[tuple[Segment, ...], tuple[Segment, ...]]:
    half = rows * seq // 2
    full, cut = divmod(half, seq)
    a, b = [], []
    if full:
        a.append(Segment(0, full, 0, seq))
    nxt = full
    if cut:
        a.append(Segment(full, 1, 0, cut))
        b.append(Segment(full, 1, cut, seq - cut))
        nxt = full + 1
    if nxt < rows:
        b.append(Segment(nxt, rows - nxt, 0, seq))
    return tuple(a), tuple(b)


def whole(rows: int, seq: int) -> tuple[Segment, ...]:
    return (Segment(0, rows, 0, seq),)


def split_sizes(lengths: list[int]) -> tuple[int, int]:
    """Token counts of the two micro-batches for requests of these lengths (cut at total // 2)."""
    total = sum(lengths)
    return total // 2, total - total // 2
