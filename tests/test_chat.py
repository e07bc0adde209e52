"""V4 chat encoding and output parsing (atom_jax.chat), no model.

Expected prompts are literal strings in DeepSeek-V4's published format (`encoding_dsv4.py`
shipped with the model; case "capital of France" is its published test case 2). Parser tests
run scripted model outputs through a stand-in tokenizer, token by token and at every split
point, and require the same reasoning / content / tool_calls every time, with no markup in
content."""

from __future__ import annotations

import json

import pytest

from atom_jax.chat import ChatSettings, EncodingError, encode_messages, plan_chat
from atom_jax.chat.encoding import MARKERS
from atom_jax.chat.tools import ToolCallParser, typed_value

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object"}, "exact": {"type": "boolean"}}}}}

TOOLS_PROMPT = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can "
    "invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter "
    "name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n"
    "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set "
    "`string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value "
    "in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by "
    "<think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool "
    "calls or final response.\n\nOtherwise, output directly after </think> with tool calls or "
    "final response.\n\n### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": '
    '["city"]}}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to '
    "invoke tool calls.\n")


# ---- encoding -----------------------------------------------------------------------------
def test_chat_mode_multi_turn_with_content_parts():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]}]
    assert encode_messages(messages) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello!"
        "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜></think>")


def test_thinking_mode_drops_earlier_reasoning():
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there! How can I help you?",
                 "reasoning_content": "The user said hello. I should greet back."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected = ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜>"
                "</think>Hi there! How can I help you?<｜end▁of▁sentence｜><｜User｜>What is the "
                "capital of France?<｜Assistant｜><think>")
    assert encode_messages(messages, thinking=True) == expected
    answered = messages + [{"role": "assistant", "content": "The capital of France is Paris.",
                            "reasoning_content": "The user asks about the capital of France. It is Paris."}]
    assert encode_messages(answered, thinking=True) == (
        expected + "The user asks about the capital of France. It is Paris.</think>The capital of "
        "France is Paris.<｜end▁of▁sentence｜>")


def test_tools_calls_and_results_chat_mode():
    messages = [{"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
                    {"id": "b", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "b", "content": "snow"},  # out of call order
                {"role": "tool", "tool_call_id": "a", "content": "sun"}]
    assert encode_messages(messages, [WEATHER]) == (
        "<｜begin▁of▁sentence｜>\n\n" + TOOLS_PROMPT +
        "<｜User｜>Weather in Paris and Oslo?<｜Assistant｜></think>Checking.\n\n"
        "<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n"
        "<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>sun</tool_result>\n\n<tool_result>snow</tool_result>"
        "<｜Assistant｜></think>")


def test_tools_thinking_keeps_reasoning_and_system_prompt():
    messages = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "Need weather.",
                 "tool_calls": [{"id": "a", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "a", "content": "{\"t\": 22}"},
                {"role": "user", "content": "And tomorrow?"}]
    assert encode_messages(messages, [WEATHER], thinking=True, reasoning_effort="max") == (
        "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
        "resolve the root cause, rigorously stress-testing your logic against all potential "
        "paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
        "deliberation process, documenting every intermediate step, considered alternative, and "
        "rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
        "Sys.\n\n" + TOOLS_PROMPT +
        "<｜User｜>Paris?<｜Assistant｜><think>Need weather.</think>\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>{\"t\": 22}</tool_result>\n\nAnd tomorrow?<｜Assistant｜><think>")


class V4Tokenizer:
    chat_format = "v4"


def test_plan_forced_tool_choice_and_errors():
    msgs = [{"role": "user", "content": "Hi"}]
    named = plan_chat(ChatSettings(), V4Tokenizer(), msgs, [WEATHER, SEARCH],
                      {"type": "function", "function": {"name": "search"}})
    assert named.prompt.endswith("<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
                                 "<｜DSML｜invoke name=\"search\">\n")
    assert not named.add_bos and named.functions is not None
    required = plan_chat(ChatSettings(), V4Tokenizer(), msgs, [WEATHER], "required")
    assert required.prompt.endswith("</think>\n\n<｜DSML｜tool_calls>\n")
    none = plan_chat(ChatSettings(), V4Tokenizer(), msgs, [WEATHER], "none")
    assert "## Tools" not in none.prompt and none.functions is None
    thinking = plan_chat(ChatSettings(thinking=True), V4Tokenizer(), msgs)
    assert thinking.prompt.endswith("<think>") and thinking.parse_reasoning
    off = plan_chat(ChatSettings(thinking=True), V4Tokenizer(), msgs, template_kwargs={"thinking": False})
    assert off.prompt.endswith("</think>")
    for kwargs in [dict(tools=[WEATHER], tool_choice="required", template_kwargs={"thinking": True}),
                   dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                   dict(tool_choice="required"), dict(template_kwargs={"thinking": "yes"}),
                   dict(tools=[{"type": "function"}])]:
        with pytest.raises(EncodingError):
            plan_chat(ChatSettings(), V4Tokenizer(), msgs, **kwargs)
    with pytest.raises(EncodingError):  # no tool role content parts other than text
        encode_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


# ---- parsing ------------------------------------------------------------------------------
# Scripted outputs as a tokenizer would cut them: markers are single tokens.
THINK_TOOLS = ["Need", " the", " weather", " for", " 東京", ".", "</think>", "Let", " me", " check",
               ".", "\n\n", "<｜DSML｜", "tool_calls", ">", "\n", "<｜DSML｜", "invoke", " name",
               "=\"", "get_weather", "\">", "\n", "<｜DSML｜", "parameter", " name=\"city\"",
               " string=\"true\"", ">", "東京 <b>", "</｜DSML｜", "parameter", ">", "\n",
               "<｜DSML｜", "parameter", " name=\"days\" string=\"false\">", "3",
               "</｜DSML｜parameter>", "\n", "</｜DSML｜invoke>", "\n",
               "<｜DSML｜invoke name=\"search\">", "\n",
               "<｜DSML｜parameter name=\"query\" string=\"true\">", "a \"quoted\"\nline",
               "</｜DSML｜parameter>", "\n", "<｜DSML｜parameter name=\"filters\" string=\"false\">",
               "{\"lang\": [\"ja\"]}", "</｜DSML｜parameter>", "\n",
               "<｜DSML｜parameter name=\"exact\" string=\"false\">", "true", "</｜DSML｜parameter>",
               "\n", "</｜DSML｜invoke>", "\n", "</｜DSML｜tool_calls>"]
EXPECTED_CALLS = [("get_weather", {"city": "東京 <b>", "days": 3}),
                  ("search", {"query": "a \"quoted\"\nline", "filters": {"lang": ["ja"]}, "exact": True})]


def _plan(thinking=True, tools=(WEATHER, SEARCH), tool_choice=None):
    return plan_chat(ChatSettings(thinking=thinking), V4Tokenizer(),
                     [{"role": "user", "content": "q"}], list(tools) or None, tool_choice)


def _run(plan, chunks):
    """Feed chunks like a stream; -> (reasoning, content, calls as (name, args), raw calls)."""
    parser = plan.parser(make_id=lambda i: f"call_{i}")
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    return reasoning, content, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                for c in calls], parser


def _splits(text):
    yield [text]
    yield list(text)  # character by character
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def test_reasoning_and_tool_calls_every_split():
    plan = _plan()
    want = ("Need the weather for 東京.", "Let me check.", EXPECTED_CALLS)
    reasoning, content, calls, parser = _run(plan, THINK_TOOLS)  # token by token
    assert (reasoning, content, calls) == want
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    text = "".join(THINK_TOOLS)
    for chunks in _splits(text):
        assert _run(plan, chunks)[:3] == want, chunks[0][-20:]


def test_plain_answer_in_chat_mode_keeps_trailing_text_and_markup_free():
    plan = _plan(thinking=False)
    text = "Tokyo is <b>big</b>.\n\nAlso <｜ is fine\n"
    for chunks in _splits(text):
        reasoning, content, calls, _ = _run(plan, chunks)
        assert (reasoning, content, calls) == ("", text, [])


def test_text_after_a_block_and_a_second_block():
    plan = _plan(thinking=False)
    text = ("A\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
            "<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>\nB <｜DSML｜function_calls>"
            "<｜DSML｜invoke name=\"search\">\n</｜DSML｜invoke></｜DSML｜function_calls>")
    for chunks in _splits(text):
        _, content, calls, _ = _run(plan, chunks)
        assert content == "AB"
        assert calls == [("get_weather", {"city": "Oslo"}), ("search", {})]


def test_forced_tool_choice_output_parses():
    plan = _plan(thinking=False, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    text = ("<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    for chunks in _splits(text):
        assert _run(plan, chunks)[:3] == ("", "", [("get_weather", {"city": "Rome"})])
    # a forced call the model does not complete: its output is content, without the prefix
    # (which is prompt, not output)
    for chunks in _splits("- not a parameter"):
        assert _run(plan, chunks)[:3] == ("", "- not a parameter", [])


@pytest.mark.parametrize("text,calls", [
    # cut short inside a call (max_tokens): the finished call stands, the rest is plain text
    ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n</｜DSML｜invoke>\n"
     "<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Os",
     [("search", {})]),
    ("x<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"a\">\n</｜DSML｜invoke></｜DSML｜tool_calls>", []),
    ("<｜DSML｜tool_calls>garbage</｜DSML｜tool_calls>", []),
    ("<｜DSML｜tool_calls><｜DSML｜invoke name=\"search\">\n<｜DSML｜parameter name=\"q\" "
     "string=\"true\">1</｜DSML｜parameter><｜DSML｜parameter name=\"q\" string=\"true\">2"
     "</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜tool_calls>", []),
])
def test_malformed_markup_falls_back_to_content(text, calls):
    plan = _plan(thinking=False)
    results = {repr(_run(plan, chunks)[:3]) for chunks in _splits(text)}
    assert len(results) == 1
    _, content, got, _ = _run(plan, [text])
    assert got == calls
    # nothing is lost: the unparsed text is content, verbatim
    assert "<｜DSML｜" in content and text.endswith(content.lstrip("x"))


def test_a_tool_call_block_ends_the_reasoning():
    plan = _plan(thinking=True)
    text = ("thinking\nmore\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n"
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    for chunks in _splits(text):
        assert _run(plan, chunks)[:3] == ("thinking\nmore", "", [("search", {})])


def test_no_tools_means_no_tool_parsing_and_unclosed_thinking_is_reasoning():
    plan = _plan(thinking=True, tools=())
    reasoning, content, calls, _ = _run(plan, ["<think>", "abc </thi", "nk", "> tail"])
    assert (reasoning, content, calls) == ("abc ", " tail", [])
    reasoning, content, _, _ = _run(plan, ["still thinking </th"])  # length cut
    assert (reasoning, content) == ("still thinking </th", "")


@pytest.mark.parametrize("text,string,schema,value", [
    ("5", "true", {"type": "integer"}, 5),
    ("5", "true", {"type": "string"}, "5"),
    ("5", "true", None, "5"),
    ("x", "false", {"type": "integer"}, "x"),  # not JSON: kept as text
    ("007", "false", {"type": "string"}, "007"),
    ("[1, 2]", "false", {"type": "array"}, [1, 2]),
    ("true", "true", {"type": ["boolean", "null"]}, True),
    ("1.5", None, {"type": "number"}, 1.5),
])
def test_typed_values(text, string, schema, value):
    got = typed_value(text, string, schema)
    assert got == value and type(got) is type(value)


def test_markers_never_reach_content_for_wellformed_output():
    parser = ToolCallParser([WEATHER["function"], SEARCH["function"]], make_id=str)
    content, calls = parser.feed("".join(THINK_TOOLS[7:]))
    more, late = parser.finish()
    assert not any(m in content + more for m in MARKERS)
    assert [c["id"] for c in calls + late] == ["0", "1"]


def test_hf_tokenizer_keeps_chat_markup_and_defaults_to_v4(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from atom_jax.tokenizer import load_tokenizer

    special = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>", "<｜DSML｜"]
    vocab = {w: i for i, w in enumerate(special + ["[UNK]", "hi", "x"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": special[0], "eos_token": special[1]}))
    hf = load_tokenizer(str(tmp_path))
    assert hf.chat_format == "v4"
    text = hf.decode([0, 2, 6, 3, 4, 7, 1])
    assert "<think>" in text and "</think>" in text and "<｜DSML｜" in text
    assert "begin▁of" not in text and "end▁of" not in text
    plan = plan_chat(ChatSettings(), hf, [{"role": "user", "content": "hi"}])
    ids = hf.encode(plan.prompt, add_bos=plan.add_bos)
    assert ids.count(0) == 1 and ids[0] == 0  # one BOS, from the encoded prompt text
