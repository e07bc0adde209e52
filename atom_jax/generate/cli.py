"""Offline batch generation over a JSONL file, resumable.

    python -m atom_jax.generate [--model DIR] --input IN.jsonl --output OUT.jsonl

Input lines:  {"id": ..., "prompt": "..." | "messages": [...] | "prompt_token_ids": [...],
               optional "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "stop_token_ids", "ignore_eos"}  (a line's fields override the flag defaults);
               with messages also "tools", "tool_choice", "chat_template_kwargs" as in
               /v1/chat/completions
Output lines: {"id", "text" (when the model has a tokenizer), "token_ids", "finish_reason",
               "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}, appended and
               flushed as each request finishes; messages lines add "message" (the parsed
               assistant message: content, reasoning_content, tool_calls). A rerun skips ids
               already in the output.

Multi-host: start one process per host with --coordinator-address / --num-processes /
--process-id (or under SLURM's srun); process 0 reads the input and writes the output, the
others run its steps (README "Multi-host").

Exit status: 0 done (bad lines, if any, were reported and skipped); 1 --strict found bad lines,
the input could not be read, or the engine broke (rerun to resume); 3 a process of a multi-host
run died or hung (rerun to resume); 130 interrupted."""

from __future__ import annotations

import argparse
import os
import sys
import time

from atom_jax.distributed import add_distributed_args
from atom_jax.engine.args import (REQUEST_DEFAULT_TEMPERATURE, add_engine_args, configure_logging,
                                  positive_int, start_engine)
from atom_jax.generate.inputs import BadLine, SamplingDefaults, encode_requests, parse_input
from atom_jax.generate.loop import EngineBroken, run_requests
from atom_jax.generate.outputs import OutputError, OutputLock, ResultWriter, prepare_output, scan_output
from atom_jax.generate.report import Progress, RunStats, summary_text, write_summary_json

MAX_BAD_LINES_SHOWN = 100


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m atom_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("files")
    g.add_argument("--input", required=True, help="input JSONL (required)")
    g.add_argument("--output", required=True,
                   help="output JSONL, appended to; ids already in it are skipped (required)")
    # --seed is a sampling default here (below); it also seeds the engine
    add_engine_args(ap, exclude=("seed",))
    g = ap.add_argument_group("sampling defaults (a line's own fields win)")
    g.add_argument("--max-tokens", type=positive_int, default=256,
                   help="most tokens to generate per request (default: 256)")
    g.add_argument("--temperature", type=float, default=REQUEST_DEFAULT_TEMPERATURE,
                   help="sampling temperature; 0 is greedy (default: 1.0, OpenAI's default, as "
                        "the server's)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass; 1 is off (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 is off (default: 0)")
    g.add_argument("--seed", type=int, default=None,
                   help="base seed: each request without its own seed gets one derived from this and "
                        "its id, reproducible across reruns; also the engine's seed (default: none, "
                        "engine seed 0)")
    g = ap.add_argument_group("run")
    g.add_argument("--max-in-flight", type=positive_int,
                   help="requests held by the engine at once (default: 2 x dp x num-slots)")
    g.add_argument("--strict", action="store_true",
                   help="run nothing if any input line is bad (default: skip bad lines)")
    g.add_argument("--retry-errors", action="store_true",
                   help="rerun ids whose earlier result was finish_reason error, removing their "
                        "old lines (default: keep them)")
    g.add_argument("--summary-json", help="also write the summary here (default: none)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress line on stderr (default: shown)")
    g.add_argument("--fsync-interval", type=float, default=5.0,
                   help="seconds between fsyncs of the output (default: 5.0)")
    g.add_argument("--profile", metavar="DIR",
                   help="write a jax.profiler trace of the first model steps here; read it with "
                        "python -m atom_jax.trace report DIR (default: none)")
    g.add_argument("--profile-steps", type=positive_int, default=5, metavar="N",
                   help="model steps to trace with --profile; steps that compile are traced "
                        "but not counted (default: 5)")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the step for every token bucket before generating "
                        "(default: on with --profile, so the trace holds run times; else off)")
    add_distributed_args(ap)
    return ap


def _log(msg: str) -> None:
    print(f"generate: {msg}", file=sys.stderr, flush=True)


class BadLineReporter:
    def __init__(self, input_path: str):
        self.input_path, self.count = input_path, 0

    def __call__(self, bad: BadLine) -> None:
        self.count += 1
        if self.count <= MAX_BAD_LINES_SHOWN:
            _log(f"{self.input_path}:{bad.line_no}: skipped: {bad.reason}")
        elif self.count == MAX_BAD_LINES_SHOWN + 1:
            _log("more bad lines follow; only the count is reported from here on")


def main(argv=None, engine=None) -> int:
    """CLI entry. `engine`: a prebuilt Engine (tests; its engine flags are then ignored)."""
    args = build_parser().parse_args(argv)
    configure_logging("info")  # the engine's compile and warm-up lines; jax's noise hidden
    if engine is not None:
        return _main(args, engine)
    try:
        start = start_engine(args, seed=args.seed or 0)
    except ValueError as e:
        _log(str(e))
        return 1
    if start.cluster is None:
        return _main(args, None, start)
    return _main_multihost(args, start)


def _main_multihost(args, start) -> int:
    """Every process builds the engine over all hosts' devices; process 0 runs the batch and
    the others run its steps until it is done."""
    cluster = start.cluster
    role = "runs the batch" if cluster.is_leader else "follows process 0"
    _log(f"process {cluster.process_id} of {cluster.num_processes} {role} (dp={start.config.dp})")
    try:
        engine = start.build()
    except Exception as e:
        _log(f"could not start the engine: {e!r}")
        return 1
    if not cluster.is_leader:
        steps = start.follow(engine)
        _log(f"process {cluster.process_id}: done after {steps} steps")
        return 0
    try:
        return _main(args, engine)
    finally:
        engine.close()  # release the other processes


def _main(args, engine, start=None) -> int:
    t_start = time.monotonic()
    if not os.path.isfile(args.input):
        _log(f"no such input file: {args.input}")
        return 1
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        _log("--input and --output are the same file")
        return 1
    try:  # before the model loads: an unwritable or busy output fails in one line, at once
        lock = OutputLock(args.output)
    except OutputError as e:
        _log(str(e))
        return 1
    with lock:
        return _run(args, engine, start, lock, t_start)


def _run(args, engine, start, lock: OutputLock, t_start: float) -> int:
    stats = RunStats()
    existing = scan_output(args.output)
    for n in existing.corrupt_lines:
        _log(f"{args.output}:{n}: not a result line; ignored")
    done_keys = existing.done_keys - existing.error_keys if args.retry_errors else existing.done_keys
    defaults = SamplingDefaults(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    report_bad = BadLineReporter(args.input)

    # Pass 1 (no model needed): syntax and field types.
    parsed = parse_input(args.input, defaults, done_keys)
    for bad in parsed.bad:
        report_bad(bad)
    stats.input_lines, stats.skipped = parsed.total_lines, parsed.skipped
    if args.strict and parsed.bad:
        _log(f"--strict: {len(parsed.bad)} bad input line(s); nothing was run")
        return 1

    if engine is None and parsed.requests:
        _log(f"loading {'model ' + args.model if args.model else 'the embedded model'} ...")
        try:
            engine = start.build()
        except Exception as e:  # bad directory or settings: one clear line, nothing written yet
            _log(f"could not start the engine: {e!r}")
            return 1
    # Pass 2 (the engine's tokenizer and context limit), still before any output is written.
    requests, rejected = encode_requests(parsed.requests, engine) if parsed.requests else ([], [])
    for bad in rejected:
        report_bad(bad)
    stats.bad = len(parsed.bad) + len(rejected)
    if args.strict and rejected:
        _log(f"--strict: {len(rejected)} input line(s) rejected by the engine; nothing was run")
        return 1

    if existing.torn_tail:
        _log(f"{args.output}: dropping a torn last line (its request runs again)")
    try:
        prepare_output(args.output, existing, args.retry_errors, lock)
    except (OSError, OutputError) as e:
        _log(f"could not prepare {args.output}: {e}")
        return 1
    if parsed.skipped:
        _log(f"{parsed.skipped} id(s) already in {args.output}: skipped")
    rc = 0
    warmup = args.warmup if args.warmup is not None else bool(args.profile)
    if warmup and engine is not None and requests:
        _log("warming up: compiling the step for every token bucket ...")
        engine.warmup()
    before = engine.stats() if engine is not None else None
    progress = Progress(len(requests), enabled=not args.no_progress)
    max_in_flight = args.max_in_flight or _default_in_flight(engine)
    t_gen = time.monotonic()
    if args.profile and engine is not None:
        engine.start_profile(args.profile, args.profile_steps)
    try:
        with ResultWriter(args.output, args.fsync_interval) as writer:
            if requests:
                run_requests(engine, requests, writer, stats, max_in_flight, progress, report_bad)
    except EngineBroken as e:
        _log(f"{e}; stopped. Rerun the same command to resume the remaining requests.")
        rc = 1
    except OSError as e:  # the output became unwritable (disk full, removed mount, ...)
        _log(f"writing {args.output} failed: {e}; stopped. Rerun to resume the remaining requests.")
        rc = 1
    except KeyboardInterrupt:
        _log("interrupted; finished results are saved. Rerun the same command to resume.")
        rc = 130
    finally:
        progress.close()
        if args.profile and engine is not None:
            engine.stop_profile()  # no-op if it already stopped after --profile-steps
            _log(f"profiler trace in {args.profile} (python -m atom_jax.trace report {args.profile})")
        stats.generate_s = time.monotonic() - t_gen
        stats.wall_s = time.monotonic() - t_start
        after = engine.stats() if engine is not None else None
        stats.padding_waste = _padding_waste(before, after)
        print(summary_text(stats), file=sys.stderr, flush=True)
        if args.summary_json:
            write_summary_json(args.summary_json, stats, after)
    return rc


def _default_in_flight(engine) -> int:
    cfg = getattr(engine, "config", None)
    # Twice what fits at once, so the scheduler always has a queue to refill freed slots from.
    return 2 * getattr(cfg, "dp", 1) * getattr(cfg, "num_slots", 16)


def _padding_waste(before: dict | None, after: dict | None) -> float | None:
    """This run's share of padded step slots (engine.stats() is cumulative over the engine's life)."""
    if not before or not after:
        return None
    slots = after["slot_tokens"] - before["slot_tokens"]
    padded = after["padded_tokens"] - before["padded_tokens"]
    return padded / slots if slots else None
