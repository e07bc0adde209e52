"""Per-request sampling parameters, validated when they are built (so once per request)."""

from __future__ import annotations

import dataclasses

from atom_jax.scheduler.validation import (MAX_INT32, MAX_STOP_STRINGS, MAX_TEMPERATURE,
                                           InvalidRequest, check_int, check_number, check_text)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What the engine needs to sample and to stop a request.

    Building one checks every field (InvalidRequest, a ValueError naming the field), so an
    instance is always valid: the engine and the scheduler never check it again. What needs
    the model (token ids in the vocabulary, the context) is `validation.check_request`.

    `stop` strings are matched by the engine on detokenised text (it then calls
    `finish(request_id, "stop")`); `stop_token_ids` and the model's EOS ids are matched here.
    `ignore_eos` only ignores the EOS ids, never `stop_token_ids` (as vLLM and SGLang do).
    `top_k` -1 or 0 is off (vLLM's convention; stored as 0). `seed` may be any int; the
    sampler keys on its low 32 bits (stored reduced). `logprobs`: the outputs carry the chosen
    tokens' logprobs (else their `logprobs` stay empty).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        # Accept lists from JSON requests but keep the object hashable and immutable.
        if isinstance(self.stop, str):
            put("stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise InvalidRequest(f"{name} must be a list, got {value!r}", name)
            put(name, tuple(value))
        check_int("max_tokens", self.max_tokens, 1, MAX_INT32)
        check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_int("top_k", self.top_k, -1, MAX_INT32)
        put("temperature", float(self.temperature))
        put("top_p", float(self.top_p))
        put("top_k", max(self.top_k, 0))
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise InvalidRequest(f"seed must be an int or None, got {self.seed!r}", "seed")
            put("seed", self.seed % 2**32)
        for t in self.stop_token_ids:
            check_int("stop_token_ids", t, 0, MAX_INT32)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got "
                                 f"{len(self.stop)}", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest(f"stop must hold non-empty strings, got {s!r}", "stop")
            check_text("stop", s)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be a bool, got {getattr(self, name)!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
