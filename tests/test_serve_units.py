"""Fast checks of the server's parts without a model: the engine thread bridge over a fake
engine (failure isolation, abort, shutdown, queue limit), stream text deltas, the bench
client's summary. The real server is exercised in test_serve.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import types

import pytest

from atom_jax.engine.info import EngineInfo
from atom_jax.engine.outputs import RequestOutput as Output
from atom_jax.scheduler import SamplingParams
from atom_jax.serve.engine_loop import EngineLoop, merged_outputs
from atom_jax.serve.errors import OpenAIError
from atom_jax.serve.prepare import PreparedRequest
from atom_jax.serve.responses import ChunkWriter, Deltas


class FakeEngine:
    """One token ('a' = 97) per request per step; `poison` ids get a malformed output."""

    def __init__(self, poison=(), fail_steps=0):
        self.live, self.done = {}, []
        self.poison, self.fail_steps = set(poison), fail_steps
        self.thread_ids = set()
        self.buckets = (8,)
        self.config = types.SimpleNamespace(num_pages=8, page_tokens=16, dp=1, num_slots=2)
        self.max_context = 128
        self.model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=256))
        self.tokenizer = types.SimpleNamespace(decode=lambda ids: bytes(ids).decode("utf-8", "replace"),
                                               encode=lambda s: list(s.encode()))

    def _touch(self):
        import threading

        self.thread_ids.add(threading.get_ident())

    def add_request(self, prompt_token_ids, params, request_id):
        self._touch()
        if prompt_token_ids == [0]:
            raise ValueError("token 0 is refused by this fake")
        self.live[request_id] = (list(prompt_token_ids), params, [])

    def abort(self, request_id):
        self._touch()
        if request_id in self.live and request_id not in dict(self.done):
            self.done.append((request_id, "abort"))
            return True
        return False

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        self._touch()
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("step blew up")
        outs = []
        for rid, reason in self.done:
            prompt, _, toks = self.live.pop(rid)
            outs.append(Output(rid, prompt, toks, [], "", "", True, reason, [0.0] * len(toks)))
        self.done = []
        for rid, (prompt, params, toks) in list(self.live.items()):
            toks.append(97)
            finished = len(toks) >= params.max_tokens
            new = None if rid in self.poison else [97]  # None: len() fails in the server
            outs.append(Output(rid, prompt, list(toks), new, "a" * len(toks), "a", finished,
                               "length" if finished else None, [-0.5] * len(toks)))
            if finished:
                del self.live[rid]
        return outs

    def stats(self):
        return {"steps": 0}

    def snapshot(self):
        rank = {"rank": 0, "num_pages": 8, "free_pages": 8, "num_slots": 2, "free_slots": 2,
                "running": len(self.live), "waiting": 0, "kv_usage": 0.0}
        return {"ranks": [rank], "num_running": len(self.live), "num_waiting": 0,
                "stats": self.stats()}


def prepared(rid, max_tokens=3, prompt=(1, 2), stop=()):
    return PreparedRequest(rid, "completion", list(prompt),
                           SamplingParams(max_tokens=max_tokens, stop=stop), False, False, False,
                           False, 0.0)


def run_loop(engine, body, **kw):
    async def main():
        loop = EngineLoop(lambda: engine, "fake", **kw)
        loop.start(asyncio.get_running_loop())
        while not loop.ready.is_set():
            await asyncio.sleep(0.01)
        try:
            return await body(loop)
        finally:
            await asyncio.to_thread(loop.shutdown, 5)
            assert loop.stopped.is_set()
    return asyncio.run(main())


def test_outputs_flow_and_engine_stays_on_its_thread():
    engine = FakeEngine()

    async def body(loop):
        streams = [await loop.submit(prepared(f"r{i}", max_tokens=2 + i)) for i in range(3)]
        finals = [await s.final_output() for s in streams]
        assert [len(f.token_ids) for f in finals] == [2, 3, 4]
        assert loop.snapshot()["in_flight"] == 0

    run_loop(engine, body)
    assert len(engine.thread_ids) == 1  # only the engine thread ever called it


def test_refused_add_and_broken_output_fail_only_their_request():
    engine = FakeEngine(poison={"bad"})

    async def body(loop):
        with pytest.raises(OpenAIError) as err:
            await loop.submit(prepared("refused", prompt=(0,)))
        assert err.value.status == 400
        good = await loop.submit(prepared("good", max_tokens=4))
        bad = await loop.submit(prepared("bad", max_tokens=4))
        with pytest.raises(OpenAIError) as err:
            await bad.final_output()
        assert err.value.status == 500
        assert (await good.final_output()).finish_reason == "length"
        later = await loop.submit(prepared("later"))
        assert (await later.final_output()).finish_reason == "length"

    run_loop(engine, body)


def test_a_failing_step_fails_in_flight_requests_and_serving_goes_on():
    engine = FakeEngine(fail_steps=1)

    async def body(loop):
        first = await loop.submit(prepared("first"))
        with pytest.raises(OpenAIError) as err:
            await first.final_output()
        assert err.value.status == 500 and err.value.code == "engine_error"
        second = await loop.submit(prepared("second"))
        assert (await second.final_output()).finish_reason == "length"

    run_loop(engine, body)


def test_abort_ends_the_stream_with_abort():
    engine = FakeEngine()

    async def body(loop):
        s = await loop.submit(prepared("long", max_tokens=10**6))
        await s.next_output()
        loop.abort("long")
        assert (await s.final_output()).finish_reason == "abort"
        assert loop.snapshot()["in_flight"] == 0

    run_loop(engine, body)


def test_shutdown_aborts_in_flight_and_refuses_new_requests():
    engine = FakeEngine()

    async def main():
        loop = EngineLoop(lambda: engine, "fake")
        loop.start(asyncio.get_running_loop())
        while not loop.ready.is_set():
            await asyncio.sleep(0.01)
        s = await loop.submit(prepared("long", max_tokens=10**6))
        await s.next_output()
        await asyncio.to_thread(loop.shutdown, 5)
        assert (await s.final_output()).finish_reason == "abort"
        assert loop.stopped.is_set()
        with pytest.raises(OpenAIError) as err:
            await loop.submit(prepared("late"))
        assert err.value.status == 503

    asyncio.run(main())


def test_waiting_limit():
    engine = FakeEngine()  # 2 slots

    async def body(loop):
        held = [await loop.submit(prepared(f"r{i}", max_tokens=10**6)) for i in range(3)]
        with pytest.raises(OpenAIError) as err:
            await loop.submit(prepared("one-too-many"))
        assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
        assert err.value.code == "queue_full"
        for s in held:
            loop.abort(s.request_id)
            await s.final_output()
        ok = await loop.submit(prepared("fits-again"))
        await ok.final_output()

    run_loop(engine, body, max_waiting=1)


def test_choices_run_as_requests_of_their_own_with_derived_seeds():
    seeded = dataclasses.replace(prepared("c", max_tokens=2), params=SamplingParams(max_tokens=2, seed=5), n=3)
    kids = seeded.choice_requests()
    assert [k.request_id for k in kids] == ["c-0", "c-1", "c-2"] and all(k.n == 1 for k in kids)
    seeds = [k.params.seed for k in kids]
    assert seeds[0] == 5 and len(set(seeds)) == 3
    assert all(k.prompt_token_ids is seeded.prompt_token_ids for k in kids)
    unseeded = dataclasses.replace(prepared("u"), n=2).choice_requests()
    assert [k.params.seed for k in unseeded] == [None, None]  # the engine draws each one
    assert prepared("one").choice_requests()[0].request_id == "one"


def test_choices_are_refused_together_and_merge_in_order():
    """One choice the engine refuses: the others are aborted and nothing stays in flight. A
    whole set: their outputs arrive merged, each choice in order, each finished once."""
    engine = FakeEngine()

    async def body(loop):
        mixed = [prepared("ok-0", max_tokens=10**6), prepared("no-1", prompt=(0,))]
        with pytest.raises(OpenAIError) as err:
            await loop.submit_all(mixed)
        assert err.value.status == 400
        streams = await loop.submit_all([prepared(f"m-{i}", max_tokens=i + 2) for i in range(3)])
        seen = {0: [], 1: [], 2: []}
        async for i, out in merged_outputs(streams):
            seen[i].append(len(out.token_ids))
        assert {i: v[-1] for i, v in seen.items()} == {0: 2, 1: 3, 2: 4}
        assert all(v == sorted(set(v)) for v in seen.values())
        for _ in range(500):  # the refused set's first choice: aborted
            if not loop.snapshot()["in_flight"]:
                break
            await asyncio.sleep(0.01)
        assert loop.snapshot()["in_flight"] == 0

    run_loop(engine, body)


class _EndsWith:
    def __init__(self, suffix):
        self.suffix = suffix

    def __contains__(self, request_id):
        return request_id.endswith(self.suffix)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_choice_fails_the_request_and_stops_the_others(stream):
    """Choice 1 of 3 gets a malformed output: the response is a 500 (streamed: an error event,
    then [DONE]) and choices 0 and 2 are aborted (not left to run to their length)."""
    from starlette.testclient import TestClient

    from atom_jax.serve.app import ServerSettings, create_app

    class SlowEngine(FakeEngine):  # 126 tokens take 2.5 s: the others end by abort, not length
        aborted = []

        def step(self):
            time.sleep(0.02)
            return super().step()

        def abort(self, request_id):
            self.aborted.append(request_id)
            return super().abort(request_id)

    engine = SlowEngine()
    engine.poison = _EndsWith("-1")
    app = create_app(ServerSettings(model_name="fake", allowed_hosts=("testserver",)), lambda: engine)
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.02)
        r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 126, "n": 3,
                                                 "stream": stream})
        if stream:
            events = [e for e in r.text.split("\n\n") if e.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "internal_error"
        else:
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        for _ in range(200):
            if client.get("/debug/engine").json()["in_flight"] == 0:
                break
            time.sleep(0.02)
        assert client.get("/debug/engine").json()["in_flight"] == 0 and not engine.live
        assert sorted(rid[-2:] for rid in engine.aborted) == ["-0", "-1", "-2"]


def test_engine_start_failure_is_reported():
    def broken():
        raise RuntimeError("no devices")

    async def main():
        loop = EngineLoop(broken, "fake")
        loop.start(asyncio.get_running_loop())
        await asyncio.to_thread(loop.stopped.wait, 5)
        assert "no devices" in loop.failure and not loop.ready.is_set()
        with pytest.raises(OpenAIError):
            await loop.submit(prepared("x"))

    asyncio.run(main())


# ---- text deltas -----------------------------------------------------------------------------
INFO = EngineInfo("m", 256, 128, FakeEngine().tokenizer, 1, 2, 8, 16, (8,))


def _out(text, n, finished=False, reason=None):
    return Output("r", [1], list(range(n)), [n - 1], text, None, finished, reason, [-1.0] * n)


def test_deltas_follow_the_engines_growing_text():
    d = Deltas(prepared("r", stop=("STOP",)), INFO)
    assert d.update(_out("ab", 1))[0] == "ab"
    assert d.update(_out("ab", 2))[0] == ""  # text held back by the engine: nothing new
    assert d.update(_out("abc\u00e9", 3, True, "stop"))[0] == "c\u00e9"


def test_chunks_carry_held_back_tokens_forward():
    req = dataclasses.replace(prepared("r"), logprobs=True)
    w = ChunkWriter(req, INFO)
    assert w.output(_out("", 1)) == []  # no visible text yet
    chunk = w.output(_out("\u00e9", 2))[0]
    assert '"tokens"' in chunk and chunk.count("-1.0") == 2  # both tokens' logprobs


def test_completion_logprobs_leave_out_a_cut_stop_string():
    """The text ends before the stop string; its tokens are not in logprobs.tokens either."""
    from atom_jax.serve.responses import full_response

    ids = list(b"hi STOP")  # the fake tokenizer: one byte per token
    req = dataclasses.replace(prepared("r", stop=("ST",)), logprobs=True)
    final = Output("r", [1], ids, ids, "hi ", None, True, "stop", [-0.5] * len(ids))
    lp = full_response(req, INFO, [final])["choices"][0]["logprobs"]
    assert lp["tokens"] == ["h", "i", " "] and lp["text_offset"] == [0, 1, 2]
    assert lp["token_logprobs"] == [-0.5] * 3
    w = ChunkWriter(req, INFO)  # streamed: the same tokens over the chunks
    chunks = [w.output(Output("r", [1], ids[:2], ids[:2], "hi", None, False, None, [-0.5] * 2)),
              w.output(final)]
    streamed = [json.loads(c[0][len("data: "):])["choices"][0]["logprobs"]["tokens"] for c in chunks]
    assert streamed == [["h", "i"], [" "]]
    # a length finish keeps every token
    full = Output("r", [1], ids, ids, "hi STOP", None, True, "length", [-0.5] * len(ids))
    assert full_response(req, INFO, [full])["choices"][0]["logprobs"]["tokens"] == list("hi STOP")


# ---- bench client summary --------------------------------------------------------------------
def test_bench_summary_and_table():
    from atom_jax.bench import serve_client

    args = types.SimpleNamespace(base_url="http://x", endpoint="completions", num_prompts=2,
                                 random_input_len=8, random_output_len=4, random_range_ratio=1.0,
                                 request_rate=float("inf"), max_concurrency=None, seed=0)
    results = [{"ok": True, "ttft": 0.1, "itl": [0.02, 0.04], "latency": 0.16, "output_len": 3,
                "prompt_len": 8, "error": None},
               {"ok": False, "ttft": None, "itl": [], "latency": None, "output_len": 0,
                "prompt_len": 8, "error": "HTTP 503"}]
    res = serve_client.summarize(args, "m", results, duration=2.0)
    assert res["completed"] == 1 and res["failed"] == 1 and res["errors"] == ["HTTP 503"]
    assert res["output_throughput"] == 1.5 and res["input_throughput"] == 4.0
    assert res["tpot"]["mean_ms"] == pytest.approx(30.0)
    assert res["itl"]["median_ms"] == pytest.approx(30.0)
    assert "Mean TTFT (ms)" in serve_client.format_table(res)
