"""One incremental detokenizer per request: new tokens in, text out, each token decoded a
bounded number of times (not the whole output every step). It serves stop strings, the
engine's `RequestOutput.text` / `delta_text` and, through them, the server's stream chunks.

The text it exposes only grows: before the request finishes it holds back a tail that may
still change, so every piece handed out is final —
  - an incomplete multi-byte character (decoded as U+FFFD until its last byte arrives);
  - the last `len(longest stop) - 1` characters, where a stop string may be completing (on a
    match the text is cut where the stop string starts).
When the request finishes the held-back tail is released (cut at the stop string, if any).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes output tokens as they arrive (vLLM's prefix / read offsets: each new piece is
    decoded together with the token before it, so tokenizers that drop a leading space at
    the start of a decode still give the right text)."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0  # decode from here, for context
        self._read = 0  # tokens up to here are decoded
        # The stable text (no character in it can change any more) is `pieces` + `_rest`:
        # `pieces` what was handed out as deltas (append-only: outputs keep views of it),
        # `_rest` the decoded text not handed out yet (held back: a few characters). Nothing
        # per step touches the whole text; `text()` joins it only when asked.
        self.pieces: list[str] = []
        self._rest = ""
        self._sent = 0  # characters handed out (in `pieces`)
        self._cut: int | None = None  # where a matched stop string starts (absolute)

    @property
    def stopped(self) -> bool:
        """A stop string matched (the text ends where it starts)."""
        return self._cut is not None

    @property
    def num_sent(self) -> int:
        """Characters handed out as deltas (the length of `pieces` joined)."""
        return self._sent

    def add(self, ids) -> bool:
        """Append new output tokens; True when a stop string now matches."""
        if self._cut is not None or not ids:
            return self.stopped
        self.ids.extend(int(t) for t in ids)
        piece = self._decode_new(final=False)
        if piece:
            before = self._sent + len(self._rest)
            self._rest += piece
            self._match_stops(before)
        return self.stopped

    def finish(self) -> None:
        """The request ended: decode whatever is left (an incomplete character becomes U+FFFD,
        as a full decode gives it)."""
        if self._cut is None and self._read < len(self.ids):
            self._rest += self._decode_new(final=True)

    def _final_len(self, finished: bool) -> int:
        """How many characters are final now."""
        if self._cut is not None:
            return self._cut
        total = self._sent + len(self._rest)
        return total if finished else max(total - self.holdback, self._sent)

    def text(self, finished: bool) -> str:
        """All text that is final now (everything once `finished`, cut at a stop string).
        O(length): the engine's outputs read `pieces` after `delta` instead."""
        return "".join(self.pieces) + self._rest[:self._final_len(finished) - self._sent]

    def delta(self, finished: bool) -> str:
        """The text that became final since the last call (appended to `pieces`)."""
        k = self._final_len(finished) - self._sent
        if k <= 0:
            return ""
        new, self._rest = self._rest[:k], self._rest[k:]
        self.pieces.append(new)
        self._sent += k
        return new

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        known = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if not final and (len(text) <= len(known) or text.endswith(REPLACEMENT)):
            return ""  # nothing new yet, or a character still arriving
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(known):]

    def _match_stops(self, before: int) -> None:
        # A new match ends in the new text: search from where one could start (the held-back
        # `holdback` characters before it are still in `_rest`, unless a finished delta sent them).
        if not self.stops:
            return
        start = max(0, before - self.holdback - self._sent)
        hits = [i for i in (self._rest.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self._cut = self._sent + min(hits)
