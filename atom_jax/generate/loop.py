"""The generation loop: keep at most `max_in_flight` requests in the engine, step it, and
write each result the moment it finishes."""

from __future__ import annotations

import collections
import itertools
import sys

from atom_jax.generate.inputs import BadLine, InputRequest
from atom_jax.generate.outputs import ResultWriter, error_record, result_record
from atom_jax.generate.report import Progress, RunStats

_run_numbers = itertools.count()  # engine request ids stay unique when one engine serves many runs
IDLE_STEPS_BEFORE_GIVING_UP = 8


class EngineBroken(RuntimeError):
    """engine.step() raised: its state is unknown, so the run stops (a rerun resumes)."""


def run_requests(engine, requests: list[InputRequest], writer: ResultWriter, stats: RunStats,
                 max_in_flight: int, progress: Progress, report_bad) -> None:
    has_tokenizer = engine.tokenizer is not None
    run = next(_run_numbers)
    pending = collections.deque(requests)
    in_flight: dict[str, InputRequest] = {}

    def write(req: InputRequest, record: dict) -> None:
        if record["finish_reason"] == "error":
            report_error(req, record["error"])
        writer.write(record)
        stats.done += 1
        stats.finish_reasons[record["finish_reason"]] += 1
        stats.failed += record["finish_reason"] == "error"
        stats.prompt_tokens += record["usage"]["prompt_tokens"]
        stats.completion_tokens += record["usage"]["completion_tokens"]

    def fail_in_flight(message: str) -> None:
        for rid, req in in_flight.items():
            write(req, error_record(req, message, has_tokenizer))
            _try_abort(engine, rid)
        progress.update(len(in_flight), 0)
        in_flight.clear()

    last_error = None

    def report_error(req: InputRequest, message: str) -> None:
        nonlocal last_error
        if message != last_error:  # once per cause, not once per request of a failed step
            print(f"generate: line {req.line_no} (id {req.id!r}) failed: {message}", file=sys.stderr,
                  flush=True)
            last_error = message

    idle_steps = 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                req = pending.popleft()
                rid = f"generate-{run}-{req.line_no}"
                try:
                    engine.add_request(prompt_token_ids=req.prompt_token_ids, params=req.params,
                                       request_id=rid, chat=req.chat)
                except ValueError as e:  # the engine's own input checks (beyond encode_requests)
                    stats.bad += 1
                    report_bad(BadLine(req.line_no, f"rejected by the engine: {e}"))
                    progress.update(1, 0)
                    continue
                except Exception as e:  # noqa: BLE001 - one request's failure must not end the run
                    write(req, error_record(req, f"add_request failed: {e!r}", has_tokenizer))
                    progress.update(1, 0)
                    continue
                in_flight[rid] = req
            if not in_flight:
                continue
            try:
                outputs = engine.step()
            except Exception as e:
                fail_in_flight(f"engine step failed: {e!r}")
                raise EngineBroken(f"engine step failed: {e!r}") from e
            finished = new_tokens = 0
            for out in outputs:
                new_tokens += len(out.new_token_ids)
                req = in_flight.get(out.request_id) if out.finished else None
                if req is not None:
                    write(req, result_record(req, out, has_tokenizer))
                    del in_flight[out.request_id]  # after the write: a failed write counts as not run
                    finished += 1
            progress.update(finished, new_tokens)
            # A request the engine dropped without a final output would spin this loop forever.
            idle_steps = 0 if outputs or engine.has_unfinished() else idle_steps + 1
            if idle_steps >= IDLE_STEPS_BEFORE_GIVING_UP:
                fail_in_flight("the engine dropped the request without a final output")
    finally:
        # Interrupted (Ctrl-C) or broken: requests without a line are redone by a rerun.
        for rid in in_flight:
            _try_abort(engine, rid)
        stats.not_run += len(pending) + len(in_flight)


def _try_abort(engine, request_id: str) -> None:
    try:
        engine.abort(request_id)
    except Exception:  # noqa: BLE001 - best effort on a failing engine
        pass
