"""One chat request, decided once: the prompt text, and how its output is split into
reasoning, content and tool calls. Used by the server (`serve/prepare.py`), the offline
`Engine.add_request(messages=...)` and `python -m atom_jax.generate`.

Settings (server flags / engine arguments):
  template          auto | v4 | tokenizer. auto: the tokenizer's own chat template when the
                    model directory has one, V4's encoding when it has none (the byte tokenizer
                    of the embedded tiny model keeps its plain `role: text` format).
  reasoning_parser  auto | deepseek-v4 | none. auto: on with the V4 encoding.
  thinking          the default of `chat_template_kwargs.thinking` for requests that do not set it.
"""

from __future__ import annotations

import dataclasses

from atom_jax.chat import encoding
from atom_jax.chat.encoding import EncodingError
from atom_jax.chat.reasoning import ReasoningParser
from atom_jax.chat.tools import ToolCallParser, new_call_id
from atom_jax.scheduler.validation import InvalidRequest, check_messages, check_strings

TEMPLATES = ("auto", "v4", "tokenizer")
REASONING_PARSERS = ("auto", "deepseek-v4", "none")
_KWARGS, _CHOICE = "chat_template_kwargs", "tool_choice"
_CHOICE_FORMS = ("tool_choice must be 'none', 'auto', 'required' or "
                 "{'type': 'function', 'function': {'name': ...}}")


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    template: str = "auto"
    reasoning_parser: str = "auto"
    thinking: bool = False

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"chat template must be one of {TEMPLATES}, got {self.template!r}")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}, "
                             f"got {self.reasoning_parser!r}")


@dataclasses.dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: "ChatDelta") -> "ChatDelta":
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class ChatParser:
    """Output text chunks -> ChatDelta (reasoning first, then the answer's content and calls);
    the same result for any split of the text."""

    def __init__(self, plan: "ChatPlan", make_id=new_call_id):
        self.reasoning = ReasoningParser(plan.thinking) if plan.parse_reasoning else None
        self.tools = ToolCallParser(plan.functions, make_id) if plan.functions is not None else None
        self.num_calls = 0
        if plan.prefix and self.tools is not None:  # a forced call's opening, in the prompt
            self.tools.prime(plan.prefix)

    def _answer(self, text: str, final: bool) -> ChatDelta:
        if self.tools is None:
            return ChatDelta(content=text)
        content, calls = self.tools.feed(text)
        if final:
            more, late = self.tools.finish()
            content, calls = content + more, calls + late
        self.num_calls += len(calls)
        return ChatDelta(content=content, tool_calls=calls)

    def feed(self, text: str) -> ChatDelta:
        reasoning, answer = self.reasoning.feed(text) if self.reasoning else ("", text)
        return ChatDelta(reasoning=reasoning).extend(self._answer(answer, final=False))

    def finish(self) -> ChatDelta:
        reasoning, answer = self.reasoning.finish() if self.reasoning else ("", "")
        return ChatDelta(reasoning=reasoning).extend(self._answer(answer, final=True))

    def parse(self, text: str) -> ChatDelta:
        return self.feed(text).extend(self.finish())

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" when the model stopped after calling tools."""
        return "tool_calls" if reason == "stop" and self.num_calls else reason


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    prompt: str
    add_bos: bool  # False when the prompt text already starts with BOS
    thinking: bool
    parse_reasoning: bool
    functions: list | None  # the declared functions; None: tool calls are not parsed
    prefix: str = ""  # forced start of the answer (already at the end of `prompt`)

    def parser(self, make_id=new_call_id) -> ChatParser:
        return ChatParser(self, make_id)

    def message(self, text: str, make_id=new_call_id) -> tuple[dict, ChatParser]:
        """A whole output -> the OpenAI assistant message (and the parser, for finish_reason)."""
        parser = self.parser(make_id)
        return self.to_message(parser.parse(text)), parser

    def to_message(self, d: ChatDelta) -> dict:
        """All of an output's deltas, joined -> the OpenAI assistant message."""
        msg = {"role": "assistant", "content": d.content}
        if self.parse_reasoning and self.thinking:
            msg["reasoning_content"] = d.reasoning
        if d.tool_calls:
            msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in d.tool_calls]
            msg["content"] = d.content or None
        return msg


def _template_kwargs(settings: ChatSettings, kwargs) -> tuple[bool, str | None]:
    kwargs = kwargs or {}
    if not isinstance(kwargs, dict):
        raise EncodingError("chat_template_kwargs must be an object", _KWARGS)
    thinking = kwargs.get("thinking", kwargs.get("enable_thinking", settings.thinking))
    if not isinstance(thinking, bool):
        raise EncodingError("chat_template_kwargs.thinking must be true or false", _KWARGS)
    effort = kwargs.get("reasoning_effort")
    if effort not in encoding.REASONING_EFFORTS:
        raise EncodingError(f"chat_template_kwargs.reasoning_effort must be one of "
                            f"{encoding.REASONING_EFFORTS[1:]}, got {effort!r}", _KWARGS)
    return thinking, effort


def _tool_choice(tool_choice, functions: list[dict], thinking: bool) -> str:
    """Validated tool_choice -> the forced prefix ("" for auto)."""
    names = [f["name"] for f in functions]
    if tool_choice in (None, "auto"):
        return ""
    if tool_choice == "required" or isinstance(tool_choice, dict):
        if not functions:
            raise EncodingError("tool_choice needs tools", _CHOICE)
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            if tool_choice.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str):
                raise EncodingError(_CHOICE_FORMS, _CHOICE)
            if fn["name"] not in names:
                raise EncodingError(f"tool_choice names {fn['name']!r}, which is not in tools "
                                    f"({', '.join(names)})", _CHOICE)
        if thinking:
            raise EncodingError("tool_choice 'required' or a named function is only supported "
                                "with thinking off (the call is forced by starting the answer "
                                "with it, which thinking would have to come before)", _CHOICE)
        return encoding.forced_tool_prefix(tool_choice)
    raise EncodingError(_CHOICE_FORMS, _CHOICE)


def plan_chat(settings: ChatSettings, tokenizer, messages: list[dict], tools=None,
              tool_choice=None, template_kwargs=None) -> ChatPlan:
    """Raises EncodingError (the request's fault) for input this format cannot take."""
    try:  # the checks every front end shares: roles, valid Unicode
        check_messages(messages)
        check_strings("tools", tools)
    except InvalidRequest as e:
        raise EncodingError(str(e), e.param) from None
    fmt = settings.template
    if fmt == "auto":
        fmt = getattr(tokenizer, "chat_format", "tokenizer")
    thinking, effort = _template_kwargs(settings, template_kwargs)
    parse_reasoning = (settings.reasoning_parser == "deepseek-v4"
                       or (settings.reasoning_parser == "auto" and fmt == "v4"))
    use_tools = bool(tools) and tool_choice != "none"
    if fmt != "v4":
        if use_tools:
            raise EncodingError("tools need the V4 chat encoding (serve with --chat-template v4)",
                                "tools")
        if tool_choice not in (None, "none", "auto"):
            raise EncodingError("tool_choice needs tools", _CHOICE)
        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": m.get("role"), "content": encoding.text_of(m.get("content"), f"messages[{i}]")}
                 for i, m in enumerate(messages)])
        except EncodingError:
            raise
        except Exception as e:  # a template's raise_exception() or a jinja error
            raise EncodingError(f"messages do not fit the chat template: {e}") from e
        return ChatPlan(prompt, True, thinking, parse_reasoning and thinking, None)
    functions = encoding.tool_functions(tools) if use_tools else []
    prefix = _tool_choice(tool_choice, functions, thinking) if tool_choice != "none" else ""
    prompt = encoding.encode_messages(messages, functions and tools, thinking=thinking,
                                      reasoning_effort=effort)
    return ChatPlan(prompt + prefix, False, thinking, parse_reasoning,
                    functions if use_tools else None, prefix)
