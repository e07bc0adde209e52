"""The embedded default model's byte-level tokenizer: ids 0-255 are bytes, then BOS and EOS."""

from __future__ import annotations

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
