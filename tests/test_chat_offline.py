"""The offline API and `python -m atom_jax.generate` with messages / tools: the real Engine
(byte tokenizer, so every multi-byte character and marker arrives byte by byte) whose model step
is replaced by a script of tokens, so no compile runs and the output is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atom_jax.engine import Engine, EngineConfig
from atom_jax.engine.runner import StepResult
from atom_jax.generate.cli import main
from atom_jax.scheduler import SamplingParams
from atom_jax.tokenizer import EOS_ID

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}
SCRIPT = ("東京を調べる</think>Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
          "<｜DSML｜parameter name=\"city\" string=\"true\">東京</｜DSML｜parameter>\n"
          "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
          "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
MESSAGES = [{"role": "user", "content": "Weather in Tokyo?"}]


@pytest.fixture(scope="module")
def engine():
    # the synchronous loop: the script indexes by tokens already read back, which the overlap
    # schedule reads one step late
    eng = Engine(EngineConfig(chat_template="v4", thinking=True, num_slots=2, num_pages=128,
                              page_tokens=32, max_pages_per_seq=96, max_tokens_per_step=512,
                              chunk_size=512, buckets=(512,), overlap_schedule=False))
    script = list(SCRIPT.encode()) + [EOS_ID]

    def scripted(plan):  # the model "says" SCRIPT, one byte per step
        seqs = plan.sampled()
        return StepResult(np.asarray([script[len(s.output_token_ids)] for s in seqs], np.int32),
                          np.zeros(len(seqs), np.float32), len(seqs))

    # the step seam: inputs = runner.host_inputs(plan); runner.run(inputs)
    eng.runner.host_inputs = lambda plan: plan
    eng.runner.run = scripted
    return eng


def _without_ids(message):
    return {**message, "tool_calls": [{k: v for k, v in c.items() if k != "id"}
                                      for c in message.get("tool_calls", [])]}


EXPECTED = {"role": "assistant", "content": "Checking.", "reasoning_content": "東京を調べる",
            "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "東京", "days": 2},
                                                               ensure_ascii=False)}}]}


def test_engine_messages_with_tools(engine):
    rid = engine.add_request(messages=MESSAGES, tools=[WEATHER], params=SamplingParams(max_tokens=600))
    prompt = engine.tokenizer.decode(engine._requests[rid].seq.prompt_token_ids)
    assert prompt.startswith("<｜begin▁of▁sentence｜>\n\n## Tools") and prompt.count("begin▁of") == 1
    assert prompt.endswith("<｜User｜>Weather in Tokyo?<｜Assistant｜><think>")
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    final = outs[-1]
    assert final.finished and final.finish_reason == "tool_calls"
    assert _without_ids(final.message) == EXPECTED
    assert "".join(o.chat.reasoning for o in outs) == "東京を調べる"
    assert "".join(o.chat.content for o in outs) == "Checking."
    assert [c["function"]["name"] for o in outs for c in o.chat.tool_calls] == ["get_weather"]
    with pytest.raises(ValueError, match="tool_choice"):
        engine.add_request(messages=MESSAGES, tools=[WEATHER], tool_choice="required")


def test_generate_writes_the_parsed_message(engine, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "t", "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 600},
             {"id": "bad", "messages": MESSAGES, "tool_choice": "required", "max_tokens": 5},
             {"id": "alsobad", "prompt": "x", "tools": [WEATHER]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["--input", str(src), "--output", str(out), "--no-progress"], engine=engine) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["t"]  # the bad lines are reported and skipped
    assert recs[0]["finish_reason"] == "tool_calls"
    assert _without_ids(recs[0]["message"]) == EXPECTED
