"""Chat with reasoning and tool calls through the server, over a stand-in engine that emits a
scripted token sequence (no model): stream chunks byte by byte, and the official `openai`
client against the real app over HTTP (stream on and off)."""

from __future__ import annotations

import json
import socket
import threading
import time
import types

import pytest

from atom_jax.chat import ChatSettings, plan_chat
from atom_jax.chat.encoding import MARKERS
from atom_jax.engine.detokenizer import IncrementalDetokenizer
from atom_jax.engine.engine import RequestOutput as Output
from atom_jax.engine.info import EngineInfo
from atom_jax.scheduler import SamplingParams
from atom_jax.serve.prepare import PreparedRequest
from atom_jax.serve.responses import ChunkWriter, full_response

BOS_ID, EOS_ID = 256, 257
PIECES = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
          "<think>", "</think>", "<｜DSML｜", "</｜DSML｜"]


class PieceTokenizer:
    """Markers are single tokens (ids 258+), every other byte is its own token (0-255): a
    multi-byte character arrives one byte per step, as with a byte-level BPE at its worst."""

    chat_format = "v4"
    bos_token_id, eos_token_id = BOS_ID, EOS_ID
    vocab_size = 258 + len(PIECES)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids, i = ([BOS_ID] if add_bos else []), 0
        while i < len(text):
            for k, piece in enumerate(PIECES):
                if text.startswith(piece, i):
                    ids.append(258 + k)
                    i += len(piece)
                    break
            else:
                ids += list(text[i].encode())
                i += 1
        return ids

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for t in ids:
            if t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
            if t >= 258:
                out.append(PIECES[t - 258])
        out.append(run.decode("utf-8", "replace"))
        return "".join(out)


TOK = PieceTokenizer()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}
# What the model "says" (after the prompt's <think> in thinking mode, </think> in chat mode).
CALL = ("東京の天気を調べる。</think>Checking ✓\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">東京</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
ANSWER = "It is sunny in 東京."
CALL_ARGS = {"city": "東京", "days": 2}


def outputs_token_by_token(script: str, rid="r"):
    """The engine's outputs for `script`, one token per step (text as the engine's detokenizer
    gives it: an incomplete character is held back)."""
    ids = TOK.encode(script, add_bos=False)
    detok = IncrementalDetokenizer(TOK)
    for n in range(1, len(ids) + 1):
        done = n == len(ids)
        detok.add(ids[n - 1:n])
        if done:
            detok.finish()
        yield Output(rid, [1], ids[:n], ids[n - 1:n], detok.text(done), None, done,
                     "stop" if done else None, [0.0] * n)


def chat_request(thinking=True, tools=(WEATHER,), stream=True):
    plan = plan_chat(ChatSettings(thinking=thinking), TOK, [{"role": "user", "content": "q"}],
                     list(tools))
    return PreparedRequest("chatcmpl-1", "chat", [1], SamplingParams(max_tokens=500), stream,
                           False, False, False, 0.0, chat=plan)


INFO = EngineInfo("scripted", TOK.vocab_size, 4096, TOK, 1, 4, 64, 64, (8,))


def test_stream_chunks_byte_by_byte_reassemble_to_the_full_response():
    req = chat_request()
    writer = ChunkWriter(req, INFO)
    chunks = [json.loads(c[len("data: "):]) for out in outputs_token_by_token(CALL)
              for c in writer.output(out)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(m in d.get("content", "") + d.get("reasoning_content", "")
                   for d in deltas for m in MARKERS)
    assert all("\ufffd" not in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
    assert len([d for d in deltas if d.get("reasoning_content")]) > 5  # streamed, not at the end
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert (reasoning, content) == ("東京の天気を調べる。", "Checking ✓")
    assert [(c["index"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [(0, "function", "get_weather", CALL_ARGS)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    final = list(outputs_token_by_token(CALL))[-1]
    body = full_response(chat_request(stream=False), INFO, [final])
    msg = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert (msg["reasoning_content"], msg["content"]) == (reasoning, content)
    assert msg["tool_calls"][0]["function"] == calls[0]["function"]


def test_without_tools_or_parser_text_is_content():
    req = chat_request(thinking=False, tools=())
    final = list(outputs_token_by_token(ANSWER))[-1]
    body = full_response(req, INFO, [final])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"


# ---- the real app over HTTP, with the openai client -------------------------------------
class ScriptedEngine:
    """Emits, one token per step, the script whose key appears in the prompt's last user turn."""

    def __init__(self, scripts: dict[str, str]):
        self.scripts = {k: TOK.encode(v, add_bos=False) for k, v in scripts.items()}
        self.tokenizer = TOK
        self.chat_settings = ChatSettings()
        self.prompts: list[str] = []
        self.live, self.done = {}, []
        self.buckets = (8,)
        self.config = types.SimpleNamespace(num_pages=64, page_tokens=64, dp=1, num_slots=4)
        self.max_context = 4096
        self.model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=TOK.vocab_size))

    def add_request(self, prompt_token_ids, params, request_id):
        prompt = TOK.decode(prompt_token_ids)
        self.prompts.append(prompt)
        last_user = prompt.rsplit("<｜User｜>", 1)[-1]
        script = next(ids for key, ids in self.scripts.items() if key in last_user)
        self.live[request_id] = (list(prompt_token_ids), params, script, [],
                                 IncrementalDetokenizer(TOK))

    def abort(self, request_id):
        if request_id in self.live:
            self.done.append(request_id)
            return True
        return False

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        outs = []
        for rid in self.done:
            prompt, _, _, toks, detok = self.live.pop(rid)
            detok.finish()
            outs.append(Output(rid, prompt, toks, [], detok.text(True), "", True, "abort", []))
        self.done = []
        for rid, (prompt, params, script, toks, detok) in list(self.live.items()):
            toks.append(script[len(toks)])
            detok.add(toks[-1:])
            finished = len(toks) == len(script) or len(toks) >= params.max_tokens
            reason = ("stop" if len(toks) == len(script) else "length") if finished else None
            if finished:
                detok.finish()
            outs.append(Output(rid, prompt, list(toks), toks[-1:], detok.text(finished), None,
                               finished, reason, [0.0] * len(toks)))
            if finished:
                del self.live[rid]
        return outs

    def stats(self):
        return {}

    def snapshot(self):
        rank = {"rank": 0, "num_pages": 64, "free_pages": 64, "num_slots": 4, "free_slots": 4,
                "running": len(self.live), "waiting": 0, "kv_usage": 0.0}
        return {"ranks": [rank], "num_running": len(self.live), "num_waiting": 0, "stats": {}}


@pytest.fixture(scope="module")
def scripted_server():
    import uvicorn

    from atom_jax.serve.app import ServerSettings, create_app

    engine = ScriptedEngine({"weather": CALL, "result": ANSWER})
    app = create_app(ServerSettings(model_name="scripted"), lambda: engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import httpx

    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", engine
    server.should_exit = True
    thread.join(10)


def test_openai_client_tool_calls_and_reasoning(scripted_server):
    openai = pytest.importorskip("openai")
    url, engine = scripted_server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    thinking = {"chat_template_kwargs": {"thinking": True}}
    resp = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER],
                                          extra_body=thinking)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGS and call.id.startswith("call_")
    assert choice.message.content == "Checking ✓"
    assert choice.message.model_extra["reasoning_content"] == "東京の天気を調べる。"
    assert engine.prompts[-1].endswith("<｜User｜>What is the weather in Tokyo?<｜Assistant｜><think>")
    assert "## Tools" in engine.prompts[-1]

    stream = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER],
                                            stream=True, extra_body=thinking)
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == ("東京の天気を調べる。", "Checking ✓", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", CALL_ARGS)]

    # The call and its result go back to the model; the answer is plain content.
    followup = messages + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "sunny (result)"}]
    for streamed in (False, True):
        r = client.chat.completions.create(model="scripted", messages=followup, tools=[WEATHER],
                                           stream=streamed)
        text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if streamed \
            else r.choices[0].message.content
        assert text == ANSWER
        assert engine.prompts[-1].endswith(
            "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
            "<｜User｜><tool_result>sunny (result)</tool_result><｜Assistant｜></think>")


def test_bad_tool_requests_are_400s(scripted_server):
    import httpx

    url, _ = scripted_server
    msgs = [{"role": "user", "content": "weather"}]
    cases = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
              "tool_choice"),
             ({"tools": [WEATHER], "tool_choice": "required",
               "chat_template_kwargs": {"thinking": True}}, "tool_choice"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"chat_template_kwargs": {"thinking": "on"}}, "chat_template_kwargs"),
             ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools")]
    for extra, param in cases:
        r = httpx.post(url + "/chat/completions", json={"messages": msgs, **extra}, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)
