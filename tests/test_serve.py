"""The real server process (`python -m atom_jax.serve`) on CPU with the embedded tiny model.

One warmed-up server serves most tests (module fixture); a second one with --max-waiting 1 and
--api-key covers the queue limit, auth and SIGTERM. Both share a persistent XLA compilation
cache, so the second starts in seconds (set ATOM_JAX_TEST_JAX_CACHE to keep it across runs).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

SMALL = ["--num-slots", "4", "--num-pages", "64", "--page-tokens", "32", "--max-model-len", "1024",
         "--max-tokens-per-step", "32", "--buckets", "8,16,32", "--max-body-bytes", "65536",
         "--no-access-log", "--log-level", "warning"]
CONTEXT = 1024  # --max-model-len (< 64 pages * 32 tokens, the default bound)
VOCAB = 512  # the embedded tiny model
API_KEY = "test-key"


class ServerProcess:
    def __init__(self, args: list[str], log_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
        env["JAX_PLATFORMS"] = "cpu"
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "atom_jax.serve", "--port",
                                      str(self.port), *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return os.environ.get("ATOM_JAX_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def server(jax_cache, tmp_path_factory):
    proc = ServerProcess([*SMALL, "--compilation-cache-dir", jax_cache],  # warm-up: the default
                         tmp_path_factory.mktemp("serve") / "server.log")
    try:
        took = proc.wait_ready(timeout=420)
        print(f"\nserver ready (warmed up) in {took:.1f} s")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def limited_server(server, jax_cache, tmp_path_factory):
    """--max-waiting 1 and an API key; no warm-up (the shared cache has the shapes); profiling
    on, a short read timeout and big bodies allowed (for the hardening tests)."""
    tmp = tmp_path_factory.mktemp("serve-limited")
    proc = ServerProcess([*SMALL, "--no-warmup", "--max-waiting", "1", "--api-key", API_KEY,
                          "--compilation-cache-dir", jax_cache, "--log-level", "info",
                          "--enable-profiling", "--profile-dir", str(tmp / "traces"),
                          "--read-timeout", "2", "--max-body-bytes", str(8 * 1024 * 1024)],
                         tmp / "server.log")
    proc.profile_dir = tmp / "traces"
    try:
        took = proc.wait_ready(timeout=300)
        print(f"\nlimited server ready in {took:.1f} s")
        yield proc
    finally:
        proc.stop()


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def sse_chunks(text: str) -> list:
    """Parsed `data:` payloads; the last one must be [DONE] (returned as the string)."""
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def engine_state(server, **kw):
    return httpx.get(server.url + "/debug/engine", timeout=10, **kw).json()


def wait_idle(server, timeout=30.0, **kw) -> dict:
    """Until no request is in flight and every page and slot is free again."""
    t0 = time.monotonic()
    while True:
        snap = engine_state(server, **kw)
        idle = snap["in_flight"] == 0 and snap["num_running"] == 0 and snap["num_waiting"] == 0 \
            and all(r["free_pages"] == r["num_pages"] and r["free_slots"] == r["num_slots"]
                    for r in snap["ranks"])
        if idle or time.monotonic() - t0 > timeout:
            return snap
        time.sleep(0.1)


# ---- basics --------------------------------------------------------------------------------
def test_health_models_and_openapi(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "atom-jax-tiny" and card["object"] == "model"
    assert card["max_model_len"] == CONTEXT and card["vocab_size"] == VOCAB
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


@pytest.mark.parametrize("prompt", ["Hello there", [5, 6, 7, 8], [[5, 6, 7]], ["Hello"]])
def test_completion(server, prompt):
    r = post(server, "/v1/completions", {"model": "atom-jax-tiny", "prompt": prompt,
                                         "max_tokens": 6, "ignore_eos": True, "logprobs": 1,
                                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "atom-jax-tiny" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and len(choice["token_ids"]) == 6
    assert len(choice["logprobs"]["token_logprobs"]) == 6
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        assert usage["prompt_tokens"] == len(prompt)


def test_prefix_cache_shows_in_usage_metrics_and_debug(server):
    """The same 80-token prompt twice: the second reuses the two full 32-token pages."""
    import random

    prompt = [random.randrange(2, VOCAB) for _ in range(80)]
    bodies = [post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "ignore_eos": True,
                                               "temperature": 0}).json() for _ in range(2)]
    cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies]
    assert cached == [0, 64], bodies
    assert bodies[0]["choices"][0]["text"] == bodies[1]["choices"][0]["text"]
    text = httpx.get(server.url + "/metrics").text
    hits = [line for line in text.splitlines() if line.startswith("atom_jax_prefix_cache_hit_tokens_total")]
    assert float(hits[0].split()[-1]) >= 64
    rank = engine_state(server)["ranks"][0]
    assert rank["cached_pages"] >= 2 and 1 <= rank["pages_with_state"] <= rank["state_pages"], rank
    assert "atom_jax_prefix_cache_state_evictions_total" in text


def test_unknown_fields_are_ignored(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "user": "u",
                                         "some_vendor_field": {"x": 1}})
    assert r.status_code == 200, r.text


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": [3, 4, 5], "max_tokens": 8, "temperature": 1.0, "seed": 1234,
            "ignore_eos": True, "return_token_ids": True}
    a = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    b = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    assert a == b


def test_n_choices_sample_their_own_seeds_and_stream_as_they_return(server):
    """n = 3: three sequences of one prompt; a seed makes each choice reproducible and the
    choices differ; usage counts the prompt once and every choice's tokens; the stream
    carries each choice by index, in order within a choice, ending with one usage chunk."""
    body = {"prompt": [7, 8, 9, 10], "max_tokens": 6, "temperature": 1.0, "seed": 77, "n": 3,
            "ignore_eos": True, "return_token_ids": True}
    full = post(server, "/v1/completions", body).json()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    ids = [c["token_ids"] for c in full["choices"]]
    assert all(len(t) == 6 for t in ids) and len({tuple(t) for t in ids}) > 1, ids
    assert full["usage"]["prompt_tokens"] == 4 and full["usage"]["completion_tokens"] == 18
    assert [c["token_ids"] for c in post(server, "/v1/completions", body).json()["choices"]] == ids
    r = post(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_chunks(r.text)
    streamed, finishes = {0: [], 1: [], 2: []}, {}
    for c in chunks[:-2]:
        (choice,) = c["choices"]
        assert choice["index"] not in finishes  # nothing after a choice's finish
        streamed[choice["index"]] += choice["token_ids"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert [streamed[i] for i in range(3)] == ids and finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 18
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2, "n": 2, "ignore_eos": True}).json()
    assert [(c["index"], c["message"]["role"]) for c in chat["choices"]] == [(0, "assistant"), (1, "assistant")]
    assert engine_state(server)["num_running"] == 0


def test_a_batch_of_prompts_returns_n_choices_per_prompt_in_order(server):
    """prompt: a list of token lists, n = 2: choice i * 2 + j is prompt i's j-th; greedy
    choices of one prompt are equal; usage counts each prompt once; a batch of strings too."""
    body = {"prompt": [[5, 6, 7], [8, 9, 10, 11, 12]], "n": 2, "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    r = post(server, "/v1/completions", body).json()
    ids = [c["token_ids"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3] and ids[0] == ids[1] and ids[2] == ids[3]
    assert r["usage"]["prompt_tokens"] == 3 + 5 and r["usage"]["completion_tokens"] == 16
    alone = post(server, "/v1/completions", {**body, "prompt": [8, 9, 10, 11, 12], "n": 1}).json()
    assert alone["usage"]["prompt_tokens"] == 5 and len(alone["choices"]) == 1
    text = post(server, "/v1/completions", {"prompt": ["Once", "upon a"], "max_tokens": 2,
                                            "ignore_eos": True}).json()
    assert [c["index"] for c in text["choices"]] == [0, 1] and text["usage"]["completion_tokens"] == 4


def test_stop_token_ids_and_stop_strings(server):
    base = {"prompt": [9, 10, 11], "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    free = post(server, "/v1/completions", base).json()["choices"][0]
    ids = free["token_ids"]
    stopped = post(server, "/v1/completions", {**base, "stop_token_ids": [ids[2]]}).json()
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"] == ids[:ids.index(ids[2]) + 1]
    printable = [c for c in free["text"] if c.isalnum()]
    if printable:  # greedy text from the random model: stop on one of its characters
        stop = printable[0]
        cut = post(server, "/v1/completions", {**base, "stop": [stop, "never-there"]}).json()
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["text"] == free["text"][:free["text"].index(stop)]
        # Streaming never leaks the stop string (held back until it cannot match).
        r = post(server, "/v1/completions", {**base, "stop": stop, "stream": True})
        text = "".join(c["choices"][0]["text"] for c in sse_chunks(r.text)[:-1])
        assert text == cut["choices"][0]["text"]


def test_completion_stream(server):
    r = post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 7, "stream": True,
                                         "ignore_eos": True, "return_token_ids": True,
                                         "logprobs": True,
                                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(r.text)
    usage_chunk, content = chunks[-2], chunks[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 7
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in content)
    assert sum(len(c["choices"][0]["token_ids"]) for c in content) == 7
    assert sum(len(c["choices"][0]["logprobs"]["token_logprobs"]) for c in content) == 7
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert len({c["id"] for c in content}) == 1


def test_chat(server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5,
                                              "ignore_eos": True, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 5
    assert body["usage"]["completion_tokens"] == 5


def test_chat_stream(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                              "max_completion_tokens": 6, "stream": True,
                                              "ignore_eos": True,
                                              "stream_options": {"include_usage": True}})
    chunks = sse_chunks(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["usage"]["completion_tokens"] == 6
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["atom-jax-tiny"]
    c = client.completions.create(model="atom-jax-tiny", prompt="Once upon", max_tokens=4,
                                  logprobs=1, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 4 and len(c.choices[0].logprobs.token_logprobs) == 4
    chat = client.chat.completions.create(model="atom-jax-tiny", max_tokens=3,
                                          messages=[{"role": "user", "content": "Hi"}],
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="atom-jax-tiny", max_tokens=4, stream=True,
                                            messages=[{"role": "user", "content": "Hi"}],
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    text_stream = client.completions.create(model="atom-jax-tiny", prompt=[1, 2], max_tokens=3,
                                            stream=True, extra_body={"ignore_eos": True})
    assert [c.choices[0].finish_reason for c in text_stream][-1] == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    two = client.completions.create(model="atom-jax-tiny", prompt="x", max_tokens=2, n=2,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 4


# ---- bad input -----------------------------------------------------------------------------
LONG = [1] * (CONTEXT + 10)
BAD_INPUTS = [
    # (name, path, body, status, param)
    ("malformed json", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("max_tokens string", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("stream not bool", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("unknown model chat", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty token prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty nested prompt", "/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("an empty prompt in a batch", "/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("a token out of vocab in a batch", "/v1/completions", {"prompt": [[1], [2, VOCAB]]}, 400, "prompt"),
    ("batch x n over 256", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 100}, 400, "prompt"),
    ("batch over 128", "/v1/completions", {"prompt": ["a"] * 129}, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
    ("prompt beyond context", "/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("prompt + max_tokens beyond context", "/v1/completions",
     {"prompt": [1, 2, 3], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("chat max_tokens beyond context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("temperature negative", "/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0.0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_k below -1", "/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("n 0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("n above 128", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 129},
     400, "n"),
    ("best_of", "/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("logit_bias", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 10.0}}, 400, "logit_bias"),
    ("echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("presence_penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400,
     "presence_penalty"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("top_logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "logprobs": True, "top_logprobs": 3}, 400, "top_logprobs"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, VOCAB]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [1, -1]}, 400, "prompt"),
    ("stop token id out of vocab", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**6]},
     400, "stop_token_ids"),
    ("empty stop string", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("oversized body", "/v1/completions", {"prompt": "x" * 70000}, 413, None),
    # lone surrogates (valid JSON, not valid Unicode): 400 naming the field, never a 500
    ("surrogate prompt", "/v1/completions", {"prompt": "ab\ud800cd"}, 400, "prompt"),
    ("surrogate prompt list", "/v1/completions", {"prompt": ["ab\ud800cd"]}, 400, "prompt"),
    ("surrogate prompt stream", "/v1/completions", {"prompt": "\udfff", "stream": True}, 400, "prompt"),
    ("surrogate chat content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi \ud800"}]}, 400, "messages"),
    ("surrogate chat text part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}],
      "stream": True}, 400, "messages"),
    ("surrogate model", "/v1/completions", {"model": "\udfff", "prompt": "x"}, 400, "model"),
    ("surrogate stop", "/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, 400, "stop"),
    ("deep nesting", "/v1/completions", b"[" * 30000, 400, None),
    ("huge number", "/v1/completions", b'{"prompt": [1' + b"0" * 5000 + b"]}", 400, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(server, name, path, body, status, param):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as JSON allows
    r = httpx.post(server.url + path, content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if status == 404:
        assert err["code"] == "model_not_found"
    if name.startswith("surrogate"):
        assert err["code"] == "invalid_unicode"
    if name in ("deep nesting", "huge number"):
        assert err["code"] == "invalid_json"


def test_json_endpoints_need_a_json_content_type(server):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 415, (headers, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_and_origin_are_checked(server):
    """DNS-rebinding defence: names other than the bind address, localhost and literal IPs are
    refused (400), and so are requests from another site's origin (403)."""
    r = httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                   headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_origin"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "10.0.0.7"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    r = httpx.get(server.url + "/v1/models", headers={"Origin": f"http://localhost:{server.port}"})
    assert r.status_code == 200


def test_profiling_is_off_by_default(server):
    assert post(server, "/start_profile", {"dir": "/tmp", "steps": 1}).status_code == 404
    assert post(server, "/stop_profile", {}).status_code == 404


def test_unknown_route_and_method_have_error_bodies(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---- metrics and disconnects ---------------------------------------------------------------
def test_metrics(server):
    # Its own traffic (the test passes alone too): a greedy run, then the same prompt stopped at
    # its second token by stop_token_ids.
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
    ids = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    stopped = post(server, "/v1/completions", {**body, "stop_token_ids": [ids[1]]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    text = httpx.get(server.url + "/metrics").text
    for name in ["atom_jax_time_to_first_token_seconds_bucket",
                 "atom_jax_inter_token_latency_seconds_bucket",
                 "atom_jax_e2e_request_latency_seconds_bucket", "atom_jax_prompt_tokens_total",
                 "atom_jax_generation_tokens_total", "atom_jax_num_requests_running",
                 "atom_jax_num_requests_waiting", "atom_jax_kv_cache_usage_ratio",
                 "atom_jax_padding_waste_ratio", 'atom_jax_delayer_decisions_total{outcome="allow"}',
                 'atom_jax_tbo_steps_total{tbo="off"}', "atom_jax_engine_steps_total"]:
        assert name in text, name
    # Tokens were generated, so the counters moved.
    gen = [line for line in text.splitlines() if line.startswith("atom_jax_generation_tokens_total")]
    assert float(gen[0].split()[-1]) > 0
    # ... and none of their requests compiled: warm-up covered every step shape.
    state = engine_state(server)
    assert state["step_compiles"]["after_warmup"] == 0
    # One source of truth: requests ended on stop token ids (here and in earlier tests); the
    # engine's counters and /metrics agree on them.
    stops = [line for line in text.splitlines()
             if line.startswith('atom_jax_requests_finished_total{finish_reason="stop"}')]
    assert stops and float(stops[0].split()[-1]) == state["stats"]["finished"]["stop"] > 0


def test_disconnects_abort_and_free_pages(server):
    """A burst of streaming clients that hang up after the first chunk, plus non-streaming
    clients that time out: every request is aborted and all pages and slots come back."""
    before = engine_state(server)["stats"]["finished"].get("abort", 0)
    got_chunk = []

    def streaming_client(i):
        body = {"prompt": [1 + i, 2, 3], "max_tokens": 600, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got_chunk.append(i)
                    return  # closes the connection mid-stream

    timed_out = []

    def impatient_client(i):  # 1000 steps cannot finish in 0.3 s: the client always gives up first
        body = {"prompt": [7 + i, 8], "max_tokens": 1000, "ignore_eos": True}
        try:
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        except httpx.ReadTimeout:
            timed_out.append(i)

    threads = [threading.Thread(target=streaming_client, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=impatient_client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got_chunk) == 6 and sorted(timed_out) == [0, 1]
    snap = wait_idle(server)
    assert snap["in_flight"] == 0, snap
    for rank in snap["ranks"]:
        assert rank["free_pages"] == rank["num_pages"] and rank["free_slots"] == rank["num_slots"]
    assert snap["stats"]["finished"].get("abort", 0) - before == 8
    # And the server still serves.
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


# ---- fuzzing ---------------------------------------------------------------------------------
def test_openapi_fuzz_no_server_errors(server):
    """schemathesis cases (valid and invalid) from /openapi.json against every operation: no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    session = requests.Session()
    seen = {}
    for op in operations:
        per_mode = 50 if op.method.upper() == "POST" else 4
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=per_mode, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                _bound_output(case, positive=mode == schemathesis.GenerationMode.POSITIVE)
                response = case.call(base_url=server.url, session=session, timeout=60)
                seen.setdefault(op.path, collections.Counter())[response.status_code] += 1
                assert response.status_code < 500, (case.body, response.text[:500])

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no parameters and no body)
                assert mode == schemathesis.GenerationMode.NEGATIVE
                assert op.method.upper() == "GET" or op.path == "/stop_profile", op.path
    assert 200 in seen["/v1/completions"] and 400 in seen["/v1/completions"], seen
    assert wait_idle(server)["in_flight"] == 0


def _bound_output(case, positive: bool):
    """Keep generated requests short (the fuzz is about input handling, not long generations)
    and, for valid cases, name the served model so they reach the engine instead of a 404."""
    if isinstance(case.body, dict):
        if positive and isinstance(case.body.get("model"), str):
            case.body["model"] = "atom-jax-tiny"
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 8:
                case.body[key] = 8
        if "messages" in case.body and not {"max_tokens", "max_completion_tokens"} & set(case.body):
            case.body["max_tokens"] = 8


# ---- benchmark client ------------------------------------------------------------------------
def test_bench_serve_client(server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "atom_jax.bench", "serve", "--base-url", server.url,
           "--num-prompts", "6", "--random-input-len", "24", "--random-output-len", "8",
           "--random-range-ratio", "0.5", "--max-concurrency", "3", "--seed", "3",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Output token throughput" in run.stdout and "Mean TTFT (ms)" in run.stdout
    res = json.loads(out.read_text())
    assert res["completed"] == 6 and res["failed"] == 0
    assert 6 * 4 <= res["total_output_tokens"] <= 6 * 8  # output lengths in [8 * 0.5, 8]
    for key in ("request_throughput", "input_throughput", "output_throughput"):
        assert res[key] > 0
    for key in ("ttft", "tpot", "itl", "e2e_latency"):
        assert set(res[key]) == {"mean_ms", "median_ms", "p99_ms"} and res[key]["mean_ms"] > 0


# ---- the limited server: auth, queue limit, SIGTERM --------------------------------------------
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_api_key(limited_server):
    r = httpx.get(limited_server.url + "/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = post(limited_server, "/v1/completions", {"prompt": "x"},
             headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(limited_server.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(limited_server.url + "/health").status_code == 200  # stays open


def _open_streams(server, n, max_tokens=400):
    """Start `n` streaming requests at once; returns (responses with status 200, refusals)."""
    client = httpx.Client(timeout=120)
    results, lock = [], threading.Lock()

    def start(i):
        req = client.build_request("POST", server.url + "/v1/completions", headers=AUTH,
                                   json={"prompt": [1, 2, 3 + i], "max_tokens": max_tokens,
                                         "ignore_eos": True, "stream": True})
        resp = client.send(req, stream=True)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arrive in order
    for t in threads:
        t.join(60)
    accepted = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    return client, accepted, refused


def test_queue_full_gets_503_with_retry_after(limited_server):
    # 4 slots + 1 waiting place: of 8 concurrent long requests, 5 are admitted.
    client, accepted, refused = _open_streams(limited_server, 8)
    try:
        assert len(accepted) == 5, [r.status_code for r in accepted + refused]
        for r in refused:
            r.read()
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
    finally:
        for r in accepted + refused:
            r.close()
        client.close()
    snap = wait_idle(limited_server, headers=AUTH)
    assert snap["in_flight"] == 0 and snap["ranks"][0]["free_pages"] == 64


def test_n_choices_are_admitted_together(limited_server):
    """4 slots + 1 waiting place: n = 6 would leave 2 waiting, so it is refused whole (503,
    nothing left in flight); n = 5 fits and returns its 5 choices."""
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}
    r = post(limited_server, "/v1/completions", {**body, "n": 6}, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
    r = post(limited_server, "/v1/completions", {**body, "n": 5}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["choices"]) == 5, r.text
    snap = wait_idle(limited_server, headers=AUTH)
    assert snap["in_flight"] == 0 and snap["ranks"][0]["free_pages"] == 64


def test_profiler_writes_only_under_its_dir_and_stays_usable(limited_server, tmp_path):
    url, root = limited_server.url, limited_server.profile_dir
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for bad in (str(a_file), str(tmp_path / "new"), "../escape", "a/b"):
        r = httpx.post(url + "/start_profile", json={"dir": bad, "steps": 1}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "dir", (bad, r.text)
    assert not (tmp_path / "new").exists() and not (root.parent / "escape").exists()
    assert a_file.read_text() == "x"
    for name in ("first", "second"):  # a traced step serves its requests; the profiler is reusable
        r = httpx.post(url + "/start_profile", json={"dir": name, "steps": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["dir"] == str(root / name), r.text
        r = post(limited_server, "/v1/completions", {"prompt": "hi", "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        deadline = time.monotonic() + 60
        while not list((root / name).glob("plugins/profile/*/*.xplane.pb")):
            assert time.monotonic() < deadline, f"no trace in {root / name}"
            time.sleep(0.2)
    r = httpx.post(url + "/stop_profile", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "profile_not_running"


def test_big_bodies_do_not_stall_other_requests(limited_server):
    """Bodies are parsed off the event loop and capped early: four 3.4 MB chat bodies and a
    long token list get their 400s while /health keeps answering."""
    chat = json.dumps({"messages": [{"role": "user", "content": "hello there"}] * 100_000}).encode()
    tokens = json.dumps({"prompt": [1] * 500_000, "max_tokens": 1}).encode()
    statuses, health = [], []

    def send(body):
        r = httpx.post(limited_server.url + ("/v1/chat/completions" if body is chat else "/v1/completions"),
                       content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=120)
        statuses.append((r.status_code, r.json()["error"]["code"]))

    def poll():
        while len(statuses) < 5:
            t0 = time.monotonic()
            assert httpx.get(limited_server.url + "/health", timeout=60).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=send, args=(b,)) for b in (chat, chat, chat, chat, tokens)]
    poller = threading.Thread(target=poll)
    poller.start()
    for t in threads:
        t.start()
    for t in threads + [poller]:
        t.join(180)
    assert sorted(statuses) == [(400, "context_length_exceeded")] + [(400, "too_many_entries")] * 4
    assert health and max(health) < 3.0, health  # the old server stalled /health for 8 s


def _half_request(url, data: bytes):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(data)
    return sock


def test_half_sent_requests_are_closed_after_the_read_timeout(limited_server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\n").encode()
    socks = [_half_request(limited_server.url, head),  # headers never finish
             _half_request(limited_server.url, head + b"Content-Length: 100\r\n\r\n{\"prompt\""),  # body stalls
             _half_request(limited_server.url, b"")]  # connects, sends nothing
    t0 = time.monotonic()
    try:
        for sock in socks:
            sock.settimeout(30)
            try:
                assert sock.recv(65536) == b""  # closed by the server (--read-timeout 2)
            except ConnectionResetError:
                pass
        took = time.monotonic() - t0
    finally:
        for sock in socks:
            sock.close()
    assert 1.0 < took < 15, took
    assert httpx.get(limited_server.url + "/health").status_code == 200


def test_sigterm_aborts_in_flight_and_exits(limited_server):
    client, accepted, _ = _open_streams(limited_server, 2, max_tokens=900)
    try:
        assert len(accepted) == 2
        lines = [r.iter_lines() for r in accepted]
        for it in lines:  # both are generating
            assert next(line for line in it if line.startswith("data: "))
        # a client stuck mid-upload does not hold the shutdown up
        stuck = _half_request(limited_server.url, (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
        t0 = time.monotonic()
        limited_server.proc.send_signal(signal.SIGTERM)
        for it in lines:
            rest = [line for line in it if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            last = json.loads(rest[-2][len("data: "):])
            assert last["choices"][0]["finish_reason"] == "abort"
        limited_server.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        for r in accepted:
            r.close()
        client.close()
        stuck.close()
    assert took < 20, took
    assert limited_server.proc.returncode in (0, -signal.SIGTERM)
    assert "engine loop stopped" in limited_server.log_tail(200)


def test_a_model_that_cannot_load_exits_nonzero(tmp_path):
    """As vLLM and SGLang do: print why and exit, so a supervisor sees it (not a server that
    stays up answering /health with "failed")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, "-m", "atom_jax.serve", "--port", str(port), "--model",
                          str(tmp_path / "nonexistent"), "--log-level", "warning"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "could not start" in run.stderr and "nonexistent" in run.stderr, run.stderr[-2000:]
