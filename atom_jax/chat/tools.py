"""DSML tool calls in the model's answer -> OpenAI `tool_calls`, streaming.

V4 writes calls after its answer text as (see `encoding.py`)

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

(V3.2's `function_calls` block name is accepted too). The parser is fed answer text in chunks
of any size and returns the content and the calls that chunk completes; the result does not
depend on how the text was split. Rules:

- No markup reaches content: text that may be the start of a block (a partial marker, and the
  whitespace before it, which belongs to the block) is held back until the next chunk decides.
- A call is released whole, once its `</｜DSML｜invoke>` arrives: one `delta.tool_calls` entry
  with index, id, name and the complete arguments JSON. A call cut short (max_tokens) or
  malformed therefore never reaches the client half-done.
- Arguments are typed by each parameter's `string` attribute and the function's JSON schema:
  `string="true"` values are strings (unless the schema wants a non-string and the text is
  that JSON), `string="false"` values are JSON (kept as text when not valid JSON or when the
  schema says string).
- Malformed or unfinished markup falls back to plain content: from the last complete call on,
  the raw text (markers included) goes to content and the rest of the output is not parsed.
"""

from __future__ import annotations

import json
import re
import uuid

from atom_jax.chat.encoding import DSML, INVOKE_END, PARAMETER_END, TOOL_CALLS_END, TOOL_CALLS_START
from atom_jax.chat.scan import held_suffix

BLOCKS = {TOOL_CALLS_START: TOOL_CALLS_END,
          f"<{DSML}function_calls>": f"</{DSML}function_calls>"}
INVOKE_OPEN = f"<{DSML}invoke"
PARAMETER_OPEN = f"<{DSML}parameter"
_INVOKE_HEAD = re.compile(rf'<{DSML}invoke\s+name="([^"<>]+)"\s*>')
_PARAMETER_HEAD = re.compile(rf'<{DSML}parameter\s+name="([^"<>]+)"(?:\s+string="(true|false)")?\s*>')

_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,), "null": (type(None),)}


def new_call_id(index: int) -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _schema_types(schema) -> set[str]:
    t = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(t, str):
        return {t}
    return {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()


def _matches(value, types: set[str]) -> bool:
    for t in types:
        py = _JSON_TYPES.get(t, ())
        if isinstance(value, py) and not (isinstance(value, bool) and t in ("integer", "number")):
            return True
    return False


def typed_value(text: str, string: str | None, schema) -> object:
    """One parameter's value from its DSML text, its `string` attribute and its schema."""
    types = _schema_types(schema)
    if types == {"string"} or (string == "true" and (not types or "string" in types)):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if string == "true" and not _matches(value, types):
        return text
    return value


class ToolCallParser:
    def __init__(self, functions: list[dict] | None = None, make_id=new_call_id):
        self.params = {f["name"]: ((f.get("parameters") or {}).get("properties") or {})
                       for f in functions or []}
        self.make_id = make_id
        self.state = "text"  # text | block | invoke | value | plain
        self.buf = ""  # text not decided yet
        self.raw = ""  # block text since the last complete call (the fallback content)
        self.block_end = ""
        self.after_block = False  # drop whitespace between a block's end and what follows
        self.call: tuple[str, dict] | None = None
        self.param: tuple[str, str | None] | None = None
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """-> (content, tool-call deltas) that `text` completes."""
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        return self._drain(final=True)

    def prime(self, markup: str) -> None:
        """Start inside markup the prompt already wrote (a forced tool call's opening): it is
        parsed, but it is not output, so a fallback to content does not repeat it."""
        content, calls = self.feed(markup)
        assert not content and not calls and not self.buf.strip(), "not a call's opening"
        self.raw = self.buf = ""  # (what is left is whitespace the next tag may follow)

    # ---- the state machine -------------------------------------------------------------
    def _drain(self, final: bool) -> tuple[str, list[dict]]:
        content, calls = [], []
        while True:
            step = getattr(self, "_" + self.state)(final, content, calls)
            if not step:
                return "".join(content), calls

    def _consume(self, n: int) -> None:
        self.raw += self.buf[:n]
        self.buf = self.buf[n:]

    def _malformed(self, content: list) -> bool:
        content.append(self.raw + self.buf)
        self.raw = self.buf = ""
        self.state = "plain"
        return False

    def _plain(self, final, content, calls) -> bool:
        content.append(self.buf)
        self.buf = ""
        return False

    def _text(self, final, content, calls) -> bool:
        if self.after_block:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.after_block = False
        hits = [(self.buf.find(m), m) for m in BLOCKS if m in self.buf]
        if hits:
            at, marker = min(hits)
            before = self.buf[:at].rstrip()
            content.append(before)
            self.buf = self.buf[len(before):]
            self.raw = ""
            self._consume(at - len(before) + len(marker))
            self.state, self.block_end = "block", BLOCKS[marker]
            return True
        cut = len(self.buf)
        if not final:
            cut -= held_suffix(self.buf, BLOCKS)
            while cut > 0 and self.buf[cut - 1].isspace():
                cut -= 1
        content.append(self.buf[:cut])
        self.buf = self.buf[cut:]
        return False

    def _expect(self, final, openings) -> tuple[str, int] | None:
        """Which of `openings` the buffer starts with after whitespace: (opening, offset);
        ("", 0) when more text is needed to tell; None when it is none of them."""
        rest = self.buf.lstrip()
        skip = len(self.buf) - len(rest)
        for opening in openings:
            if rest.startswith(opening):
                return opening, skip
        if not final and any(o.startswith(rest) for o in openings):
            return "", 0
        return None

    def _head(self, final, content, pattern, skip):
        """The tag starting at `skip` once its `>` arrived: (match, end) / waiting / malformed."""
        close = self.buf.find(">", skip)
        if close < 0:
            return None if final else False
        m = pattern.fullmatch(self.buf, skip, close + 1)
        return (m, close + 1) if m else None

    def _block(self, final, content, calls) -> bool:
        found = self._expect(final, (self.block_end, INVOKE_OPEN))
        if found is None:
            return self._malformed(content)
        opening, skip = found
        if not opening:
            return False
        if opening == self.block_end:
            self.buf = self.buf[skip + len(opening):]
            self.raw, self.state, self.after_block = "", "text", True
            return True
        head = self._head(final, content, _INVOKE_HEAD, skip)
        if head is None:
            return self._malformed(content)
        if head is False:
            return False
        m, end = head
        self.call = (m.group(1), {})
        self._consume(end)
        self.state = "invoke"
        return True

    def _invoke(self, final, content, calls) -> bool:
        found = self._expect(final, (INVOKE_END, PARAMETER_OPEN))
        if found is None:
            return self._malformed(content)
        opening, skip = found
        if not opening:
            return False
        if opening == INVOKE_END:
            name, args = self.call
            self.buf = self.buf[skip + len(opening):]
            calls.append({"index": self.num_calls, "id": self.make_id(self.num_calls),
                          "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
            self.num_calls += 1
            self.raw, self.call, self.state = "", None, "block"
            return True
        head = self._head(final, content, _PARAMETER_HEAD, skip)
        if head is None:
            return self._malformed(content)
        if head is False:
            return False
        m, end = head
        if m.group(1) in self.call[1]:  # a repeated parameter: ambiguous, not a call
            return self._malformed(content)
        self.param = (m.group(1), m.group(2))
        self._consume(end)
        self.state = "value"
        return True

    def _value(self, final, content, calls) -> bool:
        end = self.buf.find(PARAMETER_END)
        if end < 0:
            return self._malformed(content) if final else False
        (key, string), (name, args) = self.param, self.call
        schema = self.params.get(name, {}).get(key)
        args[key] = typed_value(self.buf[:end], string, schema)
        self._consume(end + len(PARAMETER_END))
        self.state = "invoke"
        return True
