"""`EngineInfo`: the read-only facts about a built engine that front ends need (model name,
vocabulary, context limit, tokenizer, shape), fixed once the engine is built and safe to read
from any thread."""

from __future__ import annotations

import dataclasses

from atom_jax.chat import ChatSettings


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Read-only facts about the built engine, safe to use from any thread."""

    model_name: str
    vocab_size: int
    max_context: int  # longest prompt + output one request may have
    tokenizer: object | None
    dp: int
    num_slots: int  # per rank
    num_pages: int  # per rank
    page_tokens: int
    buckets: tuple[int, ...]
    chat: ChatSettings = ChatSettings()  # chat template, reasoning parser, default thinking

    @classmethod
    def from_engine(cls, engine, model_name: str) -> "EngineInfo":
        cfg = engine.config
        return cls(model_name, int(engine.model.cfg.vocab_size), int(engine.max_context),
                   engine.tokenizer, cfg.dp, cfg.num_slots, cfg.num_pages, cfg.page_tokens,
                   engine.buckets, getattr(engine, "chat_settings", None) or ChatSettings())
