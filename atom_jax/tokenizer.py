"""Tokenizers, one module: the embedded models' byte tokenizer (ids 0-255 are bytes, then BOS
and EOS) with a plain-text chat format, and a model directory's HF tokenizer (`tokenizer.json`
through the `tokenizers` library, `tokenizer_config.json` for special tokens and the chat
template). `load_tokenizer` picks one."""

from __future__ import annotations

import json
import os

BOS_ID, EOS_ID = 256, 257


class ByteTokenizer:
    vocab_size = 258
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.chat_template = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size()
        # Special tokens that decoding drops; V4's think and DSML tokens are chat markup that
        # the reasoning and tool-call parsers must see, so they stay even when marked special.
        self._skip_ids = {i for i, t in self._tok.get_added_tokens_decoder().items()
                          if t.special and not _is_chat_markup(t.content)}

    @property
    def chat_format(self) -> str:
        """How `atom_jax.chat.plan_chat` renders messages by default: the directory's own
        template, or DeepSeek-V4's encoding when it has none."""
        return "tokenizer" if self.chat_template else "v4"

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([i for i in ids if i not in self._skip_ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            return default_chat_prompt(messages)
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


class ByteChatTokenizer(ByteTokenizer):
    """The embedded model's byte tokenizer with a plain-text chat format."""

    chat_format = "tokenizer"

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return default_chat_prompt(messages, add_generation_prompt)


def default_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def load_tokenizer(path: str | None):
    """-> a tokenizer, or None for a model directory without one (token-id prompts only)."""
    if path is None:
        return ByteChatTokenizer()
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    return None


def _token_text(tok):
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _is_chat_markup(token: str) -> bool:
    return token in ("<think>", "</think>") or "DSML" in token


def _raise(msg):
    raise ValueError(msg)
