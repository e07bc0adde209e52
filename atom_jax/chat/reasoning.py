"""`--reasoning-parser deepseek-v4`: the model's thinking goes to `reasoning_content`.

In thinking mode V4's prompt ends with `<think>`, so the output starts inside the reasoning and
`</think>` ends it (a repeated `<think>` at the very start is dropped); the rest is the answer.
As in DeepSeek's own parser, a tool-call block (`\n\n<｜DSML｜tool_calls>`) also ends the
reasoning: the block goes on to the tool-call parser, never into reasoning_content.
Fed text in chunks of any size, it returns the same split as for the whole text at once."""

from __future__ import annotations

from atom_jax.chat.encoding import THINK_END, THINK_START, TOOL_CALLS_START
from atom_jax.chat.scan import held_suffix

CALLS_START = "\n\n" + TOOL_CALLS_START  # ends the reasoning too; kept for the tool parser


class ReasoningParser:
    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.at_start = thinking
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content) that `text` completes."""
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """The held-back rest (an output cut short inside the reasoning stays reasoning)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.in_reasoning:
            if self.at_start:
                if not final and THINK_START.startswith(self.buf):
                    return "", ""  # may still become a repeated <think>
                if self.buf.startswith(THINK_START):
                    self.buf = self.buf[len(THINK_START):]
                self.at_start = False
            hits = [(at, m) for m in (THINK_END, CALLS_START) if (at := self.buf.find(m)) >= 0]
            if not hits:
                keep = 0 if final else held_suffix(self.buf, (THINK_END, CALLS_START))
                cut = len(self.buf) - keep
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
            end, marker = min(hits)
            skip = len(marker) if marker == THINK_END else 0
            reasoning, self.buf = self.buf[:end], self.buf[end + skip:]
            self.in_reasoning = False
        content, self.buf = self.buf, ""
        return reasoning, content
