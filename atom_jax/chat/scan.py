"""Text scanning shared by the streaming parsers."""

from __future__ import annotations


def held_suffix(text: str, markers) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`: the
    characters a streaming parser must hold back because the next chunk may complete a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(text), len(marker) - 1), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
