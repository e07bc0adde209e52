"""Request validation shared by every front end (the server, the offline `Engine` API and the
batch tool): the one place that says which sampling values, prompts and chat messages are
accepted. Python and numpy, no jax.

Two levels:
  * `SamplingParams` checks its own fields when it is built (see scheduler/sampling.py), so a
    `SamplingParams` that exists is valid and nothing downstream checks it again;
  * `check_request` checks what needs the model: token ids against the vocabulary and the
    prompt plus `max_tokens` against the context.
Errors are `InvalidRequest` (a ValueError) naming the request field, so the server can answer
with a 400 whose `param` is that field and the batch tool can report it with its line number.
"""

from __future__ import annotations

import marshal
import math

import numpy as np

MAX_INT32 = 2**31 - 1  # the sampler takes top_k and the step takes lengths as int32
MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it sampling is noise
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class InvalidRequest(ValueError):
    """A request the engine cannot run as given. `param`: the request field at fault (the
    OpenAI `param`); `code`: a machine-readable reason, or None."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, lo: int, hi: int) -> None:
    if not _is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an int in [{lo}, {hi}], got {value!r}", name)


def check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = _is_number(value) and math.isfinite(value) and (lo < value if lo_open else lo <= value) \
        and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise InvalidRequest(f"{name} must be a finite number in {bracket}{lo}, {hi}], got {value!r}",
                             name)


def check_text(name: str, value: str) -> None:
    """Text must be encodable as UTF-8: JSON can carry lone surrogates (`"\\ud800"`), which no
    tokenizer can encode and no response can echo."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{name} is not valid Unicode: a lone surrogate "
                             f"({value[e.start]!r}) at character {e.start}", name,
                             "invalid_unicode") from None


# marshal (format version 2: no back-references) writes a list or tuple as a 5-byte header
# (b"[" or b"(", int32 length) and then each item in turn; an exact int in int32 range is b"i"
# plus its int32, little-endian, and nothing else starts with b"i". So a list of n such ints is
# exactly 5 * (n + 1) bytes with b"i" every 5 bytes, and any other item (a bool: b"T"/b"F", a float,
# a numpy scalar, an int past int32, a nested list) puts its own type byte where the first of them
# sits; int subclasses and other objects marshal cannot write raise ValueError.
_MARSHAL_INT = np.dtype([("type", "u1"), ("value", "<i4")])
_FAST_MIN = 128  # shorter: the per-element check is as fast


def _token_ids_ok_fast(ids, vocab_size: int) -> bool:
    """True if `ids` (a list or tuple) holds only exact ints in [0, vocab_size), by one C
    pass (marshal) and numpy; False if it does not or this cannot tell (then ask `_bad_token_ids`).
    Never True where `_bad_token_ids` finds a bad id."""
    try:
        data = marshal.dumps(ids, 2)
    except ValueError:  # an int subclass or another object marshal cannot write (or a cycle)
        return False
    if len(data) != 5 * (len(ids) + 1):
        return False
    items = np.frombuffer(data, _MARSHAL_INT, offset=5)
    if not items.size:
        return True
    values = items["value"]
    return bool((items["type"] == ord("i")).all()) and int(values.min()) >= 0 \
        and int(values.max()) < vocab_size


def _bad_token_ids(ids, vocab_size: int) -> list:
    return [t for t in ids if not _is_int(t) or not 0 <= t < vocab_size]


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """Every id an int (not a bool) in [0, vocab_size). A long list or tuple of plain ints (a
    128K-token prompt, checked before its first chunk can launch) is accepted by
    `_token_ids_ok_fast` (128K ids: ~2-3 ms on a 2-core CPU, against ~6-9 ms for a type pass plus
    array.array and ~20 ms per element); the per-element check decides everything else, so it
    alone rejects, and its error names the first bad ids."""
    if type(ids) in (list, tuple) and len(ids) >= _FAST_MIN and _token_ids_ok_fast(ids, vocab_size):
        return
    bad = _bad_token_ids(ids, vocab_size)
    if bad:
        raise InvalidRequest(f"{name}: token ids out of range [0, {vocab_size}): {bad[:5]}", name,
                             "token_id_out_of_range")


class CheckedIds:
    """A prompt's token ids, copied and checked by `checked_token_ids`, for a caller that
    validates off the engine's thread (the server): `Engine.add_request` keeps `ids` as they
    are, with no second check or copy, when its vocabulary has this `vocab_size`. No one
    changes `ids` afterwards (the engine's Sequence reads them while it runs)."""

    __slots__ = ("ids", "vocab_size")

    def __init__(self, ids: list[int], vocab_size: int):
        self.ids, self.vocab_size = ids, vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)


def checked_token_ids(name: str, ids, vocab_size: int) -> CheckedIds:
    """`ids` copied into a new list and checked (`check_token_ids`), ready for the engine."""
    own = list(ids)  # the check sees exactly what is kept
    check_token_ids(name, own, vocab_size)
    return CheckedIds(own, vocab_size)


def check_messages(messages) -> None:
    """OpenAI chat messages as plain dicts: a non-empty list of objects whose role is one of
    CHAT_ROLES, every string in them valid Unicode. (Content and tool calls are checked by the
    chat encoding, which knows what each role may carry.)"""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", "messages")
        if m.get("role") not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}]: role must be one of {', '.join(CHAT_ROLES)}, "
                                 f"got {m.get('role')!r}", "messages")
        check_strings("messages", m)


def check_strings(name: str, value) -> None:
    """`check_text` on every string inside `value` (nested lists and dicts, keys included)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            check_text(name, v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_request(prompt_len: int, params, vocab_size: int, max_context: int,
                  prompt_param: str = "prompt") -> None:
    """What needs the model: stop token ids in the vocabulary and the prompt plus max_tokens
    within the context (a request longer than that can never finish). Prompt token ids are
    checked where the prompt is turned into ids (`check_token_ids`)."""
    check_token_ids("stop_token_ids", params.stop_token_ids, vocab_size)
    if prompt_len >= max_context:
        raise InvalidRequest(f"the prompt ({prompt_len} tokens) exceeds the context of {max_context} "
                             "tokens (prompt + output)", prompt_param, "context_length_exceeded")
    if prompt_len + params.max_tokens > max_context:
        raise InvalidRequest(f"the prompt ({prompt_len} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds the context of {max_context} tokens",
                             "max_tokens", "context_length_exceeded")
