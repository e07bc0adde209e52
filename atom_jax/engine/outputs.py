"""`RequestOutput`: what `Engine.step` returns per touched request. Making one costs O(the
step's new tokens), not O(the output so far): the cumulative fields (`token_ids`, `logprobs`,
`text`) are prefixes of the request's append-only history, materialised on first read (and
kept), so a stream that reads only the deltas (`new_token_ids`, `delta_text`) or the
`*_since` slices never copies the whole output; a final output read in full pays once."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atom_jax.chat import ChatDelta


class Prefix:
    """The first `n` items of a list that only grows past them (a request's output token ids or
    logprobs): O(1) to make, O(k) to slice."""

    __slots__ = ("items", "n")

    def __init__(self, items, n: int | None = None):
        self.items, self.n = items, len(items) if n is None else n

    def __len__(self) -> int:
        return self.n

    def since(self, start: int, stop: int | None = None) -> list:
        return self.items[start:self.n if stop is None else min(stop, self.n)]

    def full(self) -> list:
        return self.items[:self.n]


class TextPrefix:
    """The first `k` pieces of a request's text, `n` characters (the detokenizer's handed-out
    pieces only grow): `since(c)` joins only the pieces after character c."""

    __slots__ = ("pieces", "k", "n")

    def __init__(self, pieces: list[str], k: int | None = None, n: int | None = None):
        self.pieces = pieces
        self.k = len(pieces) if k is None else k
        self.n = sum(map(len, pieces[:self.k])) if n is None else n

    @classmethod
    def of(cls, text: str) -> TextPrefix:
        return cls([text], 1, len(text))

    def __len__(self) -> int:
        return self.n

    def since(self, start: int) -> str:
        want = self.n - max(start, 0)
        if want <= 0:
            return ""
        i, have = self.k, 0  # walk back over the pieces that hold the last `want` characters
        while have < want:
            i -= 1
            have += len(self.pieces[i])
        tail = "".join(self.pieces[i:self.k])
        return tail[have - want:]

    def full(self) -> str:
        return "".join(self.pieces[:self.k])


class RequestOutput:
    """One request's output after a step (vLLM's cumulative RequestOutput, with the step's
    delta alongside):
      request_id, prompt_token_ids (one list shared by a request's outputs, read only),
      token_ids     all output tokens so far (a list, built on first read)
      new_token_ids the tokens this output adds (this step's: cheap, the streaming field)
      text          the text that is final so far (None without a tokenizer); only grows;
                    built on first read
      delta_text    what `text` gained since this request's previous output
      finished, finish_reason,
      logprobs      the chosen tokens' logprobs so far, when the request's params ask for them
      chat          chat requests: this output's reasoning / content / tool calls
      message       chat requests, once finished: the OpenAI assistant message
      num_cached_tokens  prompt tokens found in the prefix cache (usage.cached_tokens)
      error         why, when finish_reason is "error"
    `token_ids` / `logprobs` / `text` may be given as lists and a string, or (the engine) as
    `Prefix` / `TextPrefix` views of the request's history. A consumer that may skip outputs
    (the server's stream keeps only the newest) reads what it has not seen with
    `token_ids_since(i)`, `logprobs_since(i, stop)` and `text_since(c)`, O(what is new)."""

    __slots__ = ("request_id", "prompt_token_ids", "new_token_ids", "delta_text", "finished",
                 "finish_reason", "chat", "message", "num_cached_tokens", "error",
                 "_tokens", "_logprobs", "_text", "_cache")

    def __init__(self, request_id: str, prompt_token_ids: list[int], token_ids, new_token_ids: list[int],
                 text, delta_text: str | None, finished: bool, finish_reason: str | None, logprobs,
                 chat: ChatDelta | None = None, message: dict | None = None, num_cached_tokens: int = 0,
                 error: str | None = None):
        self.request_id, self.prompt_token_ids = request_id, prompt_token_ids
        self.new_token_ids, self.delta_text = new_token_ids, delta_text
        self.finished, self.finish_reason = finished, finish_reason
        self.chat, self.message = chat, message
        self.num_cached_tokens, self.error = num_cached_tokens, error
        self._cache = None  # what was built on read (made then: the engine's outputs are mostly never read in full)
        # (views, from the engine: as they are, nothing built per step)
        self._tokens = token_ids if type(token_ids) is Prefix else self._given(token_ids, Prefix, "token_ids")
        self._logprobs = logprobs if type(logprobs) is Prefix else self._given(logprobs, Prefix, "logprobs")
        self._text = text if text is None or type(text) is TextPrefix else self._given(text, TextPrefix, "text")

    def _given(self, v, view, key: str):
        """A plain value (tests, fakes; None: empty) is viewed whole and read back as itself."""
        if isinstance(v, view):
            return v
        if v is None:
            v = []
        if self._cache is None:
            self._cache = {}
        self._cache[key] = v
        return TextPrefix.of(v) if view is TextPrefix else Prefix(v)

    # -- the cumulative fields: built on first read -----------------------------------------
    @property
    def token_ids(self) -> list[int]:
        return self._full("token_ids", self._tokens)

    @property
    def logprobs(self) -> list[float]:
        return self._full("logprobs", self._logprobs)

    @property
    def text(self) -> str | None:
        return None if self._text is None else self._full("text", self._text)

    def _full(self, key, view):
        if self._cache is None:
            self._cache = {}
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = view.full()
        return v

    # -- cheap reads ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """len(token_ids), without building it."""
        return len(self._tokens)

    @property
    def text_len(self) -> int:
        """len(text) (0 without text), without building it."""
        return 0 if self._text is None else len(self._text)

    def token_ids_since(self, start: int) -> list[int]:
        """token_ids[start:]."""
        return self._tokens.since(start)

    def logprobs_since(self, start: int, stop: int | None = None) -> list[float]:
        """logprobs[start:stop]."""
        return self._logprobs.since(start, stop)

    def text_since(self, start: int) -> str:
        """(text or "")[start:]."""
        return "" if self._text is None else self._text.since(start)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, num_tokens={self.num_tokens}, "
                f"new_token_ids={self.new_token_ids!r}, delta_text={self.delta_text!r}, "
                f"finished={self.finished}, finish_reason={self.finish_reason!r})")
