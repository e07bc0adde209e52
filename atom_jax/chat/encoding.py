"""DeepSeek-V4's chat encoding: OpenAI-style messages (and tools) -> the prompt text.

The layout follows what DeepSeek publishes with the model, `encoding/encoding_dsv4.py` in the
deepseek-ai/DeepSeek-V4-Flash / -Pro repositories (read through public copies, e.g.
github.com/supermy/ds4rs encoding/encoding_dsv4.py; sglang and vLLM ship the same file). The
code is ours; the special tokens and the tools prompt text are the model's and must match it
byte for byte:

    <｜begin▁of▁sentence｜>{system}[\\n\\n{tools prompt}]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>     (chat mode)
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}...     (thinking mode)

Tool calls are written in DSML after the answer text, and tool results go back to the model
inside the next user turn as `<tool_result>...</tool_result>` blocks (V4 has no tool role):

    {answer}\\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls><｜end▁of▁sentence｜>

Thinking mode drops the reasoning of turns before the last user message (the model was trained
that way), unless tools are present. Request-level `tools` go into the system prompt: the first
message's when it is a system message, else a new empty system message in front.
"""

from __future__ import annotations

import json

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n")
REASONING_EFFORTS = (None, "high", "max")  # "high" renders like None, as upstream

TOOLS_PROMPT = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    f'by writing a "{TOOL_CALLS_START}" block like the following:\n\n'
    f"{TOOL_CALLS_START}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_END}\n'
    "...\n"
    f"{INVOKE_END}\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_END}\n"
    f"{TOOL_CALLS_END}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.'
    "\n\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
    f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
    "calls.\n")

# Everything a prompt or an output may contain only as markup (never in content).
MARKERS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)


class EncodingError(ValueError):
    """The messages cannot be written in this format (the caller's input is at fault);
    `param` names the request field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def text_of(content, where: str) -> str:
    """A message's content as text: a string, None, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise EncodingError(f"{where}: only text content parts ({{'type': 'text', "
                                    "'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise EncodingError(f"{where}: content must be a string or a list of text parts")


def tool_functions(tools) -> list[dict]:
    """OpenAI `tools` ([{"type": "function", "function": {...}}]) -> the function dicts."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise EncodingError(f"tools[{i}] must be {{'type': 'function', 'function': "
                                "{'name': ..., 'parameters': ...}}", "tools")
        functions.append(fn)
    return functions


def render_tools(functions: list[dict]) -> str:
    return TOOLS_PROMPT.replace("{tool_schemas}", "\n".join(to_json(f) for f in functions))


def _call_arguments(call: dict, where: str) -> tuple[str, dict]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise EncodingError(f"{where}: a tool call needs function.name and function.arguments")
    raw = fn.get("arguments")
    if isinstance(raw, dict):
        return fn["name"], raw
    try:
        args = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):  # not a JSON object: passed through as one parameter
        args = {"arguments": raw}
    return fn["name"], args


def render_parameter(name: str, value) -> str:
    is_str = isinstance(value, str)
    return (f'<{DSML}parameter name="{name}" string="{"true" if is_str else "false"}">'
            f"{value if is_str else to_json(value)}{PARAMETER_END}")


def render_tool_calls(calls: list[tuple[str, dict]]) -> str:
    """(name, arguments) pairs -> the DSML block an assistant turn ends with (no leading \\n\\n)."""
    invokes = []
    for name, args in calls:
        params = "\n".join(render_parameter(k, v) for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n{INVOKE_END}')
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _merge_turns(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> V4 turns: tool results join the following user text in one user turn
    (parts separated by a blank line), ordered like the calls of the assistant turn before."""
    turns, call_order = [], {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EncodingError(f"messages[{i}] must be an object")
        role, where = m.get("role"), f"messages[{i}]"
        if role in ("user", "tool"):
            text = text_of(m.get("content"), where)
            part = (("text", text, None) if role == "user" else
                    ("tool", f"<tool_result>{text}</tool_result>", m.get("tool_call_id")))
            if turns and turns[-1]["role"] == "user":
                turns[-1]["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part], "order": call_order})
        elif role == "assistant":
            calls = [_call_arguments(c, f"{where}.tool_calls[{j}]")
                     for j, c in enumerate(m.get("tool_calls") or [])]
            call_order = {c.get("id"): j for j, c in enumerate(m.get("tool_calls") or [])
                          if isinstance(c, dict) and c.get("id")}
            reasoning = m.get("reasoning_content")
            turns.append({"role": "assistant", "content": text_of(m.get("content"), where),
                          "reasoning": reasoning if isinstance(reasoning, str) else "",
                          "calls": calls})
        elif role in ("system", "developer"):
            content = text_of(m.get("content"), where)
            if role == "developer" and not content:
                raise EncodingError(f"{where}: a developer message needs content")
            turns.append({"role": role, "content": content})
        else:
            raise EncodingError(f"{where}: unknown role {role!r}")
    for t in turns:
        if t["role"] == "user":
            order = t.pop("order")
            tools = sorted((p for p in t["parts"] if p[0] == "tool"),
                           key=lambda p: order.get(p[2], 0))
            it = iter(tools)
            t["text"] = "\n\n".join((next(it) if p[0] == "tool" else p)[1] for p in t["parts"])
    return turns


def encode_messages(messages: list[dict], tools=None, *, thinking: bool = False,
                    reasoning_effort: str | None = None, drop_thinking: bool = True,
                    add_bos: bool = True) -> str:
    """The prompt for `messages`; ends with the assistant's opening (`<｜Assistant｜></think>` or
    `<｜Assistant｜><think>`) when the last message is a user, developer or tool message."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise EncodingError(f"reasoning_effort must be one of {REASONING_EFFORTS[1:]}, "
                            f"got {reasoning_effort!r}", "chat_template_kwargs")
    turns = _merge_turns(list(messages))
    functions = tool_functions(tools)
    if functions:
        if not turns or turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": ""})
        turns[0]["tools"] = functions
        drop_thinking = False  # with tools, past reasoning stays (upstream's rule)
    last_user = max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")),
                    default=-1)
    if thinking and drop_thinking:  # developer turns before the last user turn are dropped
        turns = [t for i, t in enumerate(turns) if t["role"] != "developer" or i >= last_user]
        last_user = max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")),
                        default=-1)
    out = [BOS] if add_bos else []
    if thinking and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX)
    for i, t in enumerate(turns):
        role = t["role"]
        if role == "system":
            out.append(t["content"])
            if t.get("tools"):
                out.append("\n\n" + render_tools(t["tools"]))
        elif role == "developer":
            out.append(USER + t["content"])
        elif role == "user":
            out.append(USER + t["text"])
        else:  # assistant
            if thinking and (not drop_thinking or i > last_user):
                out.append(t["reasoning"] + THINK_END)
            out.append(t["content"])
            if t["calls"]:
                out.append("\n\n" + render_tool_calls(t["calls"]))
            out.append(EOS)
        next_role = turns[i + 1]["role"] if i + 1 < len(turns) else None
        if role in ("user", "developer") and next_role in (None, "assistant"):
            opens = thinking and (not drop_thinking or i >= last_user)
            out.append(ASSISTANT + (THINK_START if opens else THINK_END))
    return "".join(out)


def forced_tool_prefix(tool_choice) -> str:
    """Text the assistant turn starts with so the model must call a tool (chat mode only):
    `required` opens the tool-call block, a named function also opens its invoke."""
    if tool_choice == "required":
        return f"\n\n{TOOL_CALLS_START}\n"
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return f'\n\n{TOOL_CALLS_START}\n<{DSML}invoke name="{name}">\n'
    return ""
