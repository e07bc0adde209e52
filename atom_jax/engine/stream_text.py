"""Which part of a request's cumulative decoded text may be streamed now.

Before the request finishes, the tail may still change: a stop string may be completing there
(the text is cut where it starts) or a multi-byte character may still be arriving (decoded as
U+FFFD for now). Holding that tail back keeps every streamed delta final. The engine's
`RequestOutput.delta_text` and the server's stream chunks both use this rule."""

from __future__ import annotations


def stop_holdback(stops) -> int:
    """Characters to hold back: one less than the longest stop string."""
    return max((len(s) for s in stops), default=1) - 1


def streamable(text: str, holdback: int, finished: bool) -> str:
    """The prefix of `text` that no later token can change (all of it once finished)."""
    if finished:
        return text
    safe = len(text) - holdback
    while safe > 0 and text[safe - 1] == "\ufffd":  # a multi-byte character still arriving
        safe -= 1
    return text[:max(safe, 0)]


def delta(sent: str, text: str) -> tuple[str, str]:
    """-> (what is new since `sent`, the new `sent`). When decoding changed text already sent
    (a tokenizer merge), nothing is safe to add and `sent` stays."""
    if not text.startswith(sent):
        return "", sent
    return text[len(sent):], text
