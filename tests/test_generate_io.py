"""atom_jax.generate without a model: input validation, the output scan (resume), torn-line
repair, --retry-errors rewriting, and the loop's error handling over a fake engine."""

from __future__ import annotations

import json
import types

import pytest

from atom_jax.generate.inputs import SamplingDefaults, parse_input
from atom_jax.generate.loop import EngineBroken, run_requests
from atom_jax.generate.outputs import ResultWriter, prepare_output, scan_output
from atom_jax.generate.report import Progress, RunStats, summary_text


def _write_lines(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


def test_parse_input_reports_each_bad_line_with_its_number(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [
        {"id": "a", "prompt": "x"},
        "{not json",
        {"id": "a", "prompt": "again"},            # duplicate
        {"prompt": "no id"},
        {"id": "b"},                                # no prompt
        {"id": "c", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # two prompts
        {"id": "d", "prompt": "x", "max_tokens": 2.5},
        {"id": "e", "prompt": "x", "temperature": True},
        {"id": "f", "prompt_token_ids": [1, "2"]},
        {"id": "g", "messages": [{"role": "wizard", "content": "hi"}]},
        {"id": "h", "prompt": "x", "stop": [""]},
        {"id": "i", "prompt": "x", "top_p": 0},
        ["a", "list"],
        {"id": 1, "prompt_token_ids": [1, 2]},
        {"id": "1", "prompt": "string id 1 is a different id from int 1"},
    ])
    with open(src, "ab") as f:
        f.write(b'{"id": "u", "prompt": "\xff"}\n\n   \n')  # bad UTF-8, then blank lines (ignored)
    parsed = parse_input(str(src), SamplingDefaults())
    assert [r.id for r in parsed.requests] == ["a", 1, "1"]
    reasons = {b.line_no: b.reason for b in parsed.bad}
    assert sorted(reasons) == list(range(2, 14)) + [16]
    assert "invalid JSON" in reasons[2] and "duplicate id 'a' (first on line 1)" in reasons[3]
    assert "missing id" in reasons[4] and "exactly one" in reasons[5] and "exactly one" in reasons[6]
    assert "max_tokens" in reasons[7] and "temperature" in reasons[8] and "prompt_token_ids" in reasons[9]
    assert "messages[0]" in reasons[10] and "stop" in reasons[11] and "top_p" in reasons[12]
    assert "JSON object" in reasons[13] and "UTF-8" in reasons[16]
    assert parsed.total_lines == 16


def test_line_fields_override_defaults_and_seeds_are_per_id(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "x", "max_tokens": 3, "temperature": 0, "top_k": 5, "top_p": 0.5,
         "seed": 11, "stop": "END", "ignore_eos": True, "stop_token_ids": [9]},
        {"id": "c", "prompt": "x"},
    ])
    defaults = SamplingDefaults(max_tokens=7, temperature=0.8, top_p=0.9, top_k=40, seed=123)
    a, b, c = parse_input(str(src), defaults).requests
    assert (a.params.max_tokens, a.params.temperature, a.params.top_p, a.params.top_k) == (7, 0.8, 0.9, 40)
    assert (b.params.max_tokens, b.params.temperature, b.params.top_p, b.params.top_k) == (3, 0.0, 0.5, 5)
    assert b.params.seed == 11 and b.params.stop == ("END",) and b.params.ignore_eos
    assert b.params.stop_token_ids == (9,)
    # derived seeds: distinct per id, stable across runs, absent without --seed
    assert a.params.seed != c.params.seed
    assert a.params.seed == parse_input(str(src), defaults).requests[0].params.seed
    assert parse_input(str(src), SamplingDefaults()).requests[0].params.seed is None


def test_done_ids_are_skipped_not_reported(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": "a", "prompt": "x"}, {"id": 2, "prompt": "y"}, {"id": "c", "prompt": "z"}])
    parsed = parse_input(str(src), SamplingDefaults(), done_keys={'"a"', "2"})
    assert [r.id for r in parsed.requests] == ["c"] and parsed.skipped == 2 and not parsed.bad


def test_scan_output_drops_torn_tail_and_keeps_complete_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    good = [{"id": "a", "finish_reason": "length"}, {"id": 3, "finish_reason": "error"}]
    _write_lines(out, good)
    size = out.stat().st_size
    with open(out, "a") as f:
        f.write('{"id": "b", "finish_reason": "len')  # a write cut short by a kill
    state = scan_output(str(out))
    assert state.done_keys == {'"a"', "3"} and state.error_keys == {"3"}
    assert state.torn_tail and state.keep_bytes == size
    prepare_output(str(out), state, retry_errors=False)
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == good


def test_torn_tail_that_parses_is_still_dropped(tmp_path):
    # cut exactly before the newline: valid JSON, but we cannot tell it apart from a torn write
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}')
    state = scan_output(str(out))
    assert state.done_keys == {'"a"'} and state.torn_tail


def test_retry_errors_rewrites_without_error_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    _write_lines(out, [{"id": "a", "finish_reason": "stop"}, {"id": "b", "finish_reason": "error"},
                       "garbage", {"id": "c", "finish_reason": "length"}])
    with open(out, "a") as f:
        f.write('{"id": "d"')
    state = scan_output(str(out))
    assert state.corrupt_lines == [3]
    prepare_output(str(out), state, retry_errors=True)
    lines = out.read_text().splitlines()
    assert lines == [json.dumps({"id": "a", "finish_reason": "stop"}), "garbage",
                     json.dumps({"id": "c", "finish_reason": "length"})]


def test_missing_output_is_empty_state(tmp_path):
    state = scan_output(str(tmp_path / "none.jsonl"))
    assert not state.done_keys and not state.torn_tail


# ---- the loop over a fake engine ----------------------------------------------------------

class FakeEngine:
    """Finishes each request after one step with two tokens; `fail_ids` finish with "error",
    `reject_ids` raise ValueError at add_request, `break_at_step` raises from step()."""

    tokenizer = None

    def __init__(self, fail_ids=(), reject_ids=(), break_at_step=None):
        self.live, self.steps, self.aborted = [], 0, []
        self.fail_ids, self.reject_ids, self.break_at_step = fail_ids, reject_ids, break_at_step
        self.max_live = 0

    def add_request(self, prompt_token_ids, params, request_id, chat=None):
        if request_id.endswith(tuple(f"-{n}" for n in self.reject_ids)):
            raise ValueError("nope")
        self.live.append(request_id)
        self.max_live = max(self.max_live, len(self.live))

    def step(self):
        self.steps += 1
        if self.steps == self.break_at_step:
            raise RuntimeError("boom")
        outs = []
        for rid in self.live[:2]:  # two per step: requests wait in the engine
            failed = rid.endswith(tuple(f"-{n}" for n in self.fail_ids))
            outs.append(types.SimpleNamespace(request_id=rid, new_token_ids=[5, 6], token_ids=[5, 6], text=None,
                                              finished=True, finish_reason="error" if failed else "length"))
        self.live = self.live[2:]
        return outs

    def has_unfinished(self):
        return bool(self.live)

    def abort(self, rid):
        self.aborted.append(rid)


def _requests(tmp_path, n):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": f"r{i}", "prompt_token_ids": [1, 2, 3]} for i in range(n)])
    reqs = parse_input(str(src), SamplingDefaults()).requests
    import array
    for r in reqs:
        r.prompt_token_ids = array.array("i", r.prompt["prompt_token_ids"])
    return reqs


def test_loop_caps_in_flight_and_writes_errors_and_rejections(tmp_path):
    eng = FakeEngine(fail_ids=(3,), reject_ids=(5,))
    stats, bad = RunStats(), []
    with ResultWriter(str(tmp_path / "out.jsonl")) as w:
        run_requests(eng, _requests(tmp_path, 8), w, stats, 3, Progress(8, enabled=False), bad.append)
    recs = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert eng.max_live <= 3
    assert sorted(r["id"] for r in recs) == sorted(f"r{i}" for i in range(8) if i != 4)  # line 5 = r4
    assert [b.line_no for b in bad] == [5]
    assert {r["id"]: r["finish_reason"] for r in recs}["r2"] == "error"  # line 3
    assert stats.done == 7 and stats.failed == 1 and stats.bad == 1 and stats.not_run == 0
    assert recs[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert "text" not in recs[0]  # token-id-only model: no text field


def test_broken_engine_writes_errors_for_in_flight_and_leaves_the_rest(tmp_path):
    eng = FakeEngine(break_at_step=2)
    stats = RunStats()
    with pytest.raises(EngineBroken), ResultWriter(str(tmp_path / "out.jsonl")) as w:
        run_requests(eng, _requests(tmp_path, 10), w, stats, 4, Progress(10, enabled=False), print)
    recs = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    # step 1 finished r0, r1; step 2 broke with r2..r5 in flight; r6..r9 never started
    assert [r["finish_reason"] for r in recs] == ["length"] * 2 + ["error"] * 4
    assert all("boom" in r["error"] for r in recs[2:])
    assert stats.not_run == 4 and stats.failed == 4 and len(eng.aborted) == 4
    assert "4 not run" in summary_text(stats)


def test_progress_without_tqdm_prints_a_plain_line(monkeypatch):
    import io
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    stream = io.StringIO()
    p = Progress(3, stream=stream)
    p.update(1, 10)  # first update prints at once (no line printed yet)
    p.update(2, 5)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("generate: 1/3 requests, 10 tokens,") and lines[-1].startswith("generate: 3/3")
    assert "tok/s" in lines[-1]
