"""Offline batch generation over a JSONL file, resumable.

    python -m atom_jax.generate [--model DIR] --input IN.jsonl --output OUT.jsonl

Input lines:  {"id": ..., "prompt": "..." | "messages": [...] | "prompt_token_ids": [...],
               optional "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "stop_token_ids", "ignore_eos"}  (a line's fields override the flag defaults)
Output lines: {"id", "text" (when the model has a tokenizer), "token_ids", "finish_reason",
               "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}, appended and
               flushed as each request finishes. A rerun skips ids already in the output.

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

from atom_jax.distributed import add_distributed_args, resolve as resolve_distributed
from atom_jax.kernels.names import MOE_BACKENDS
from atom_jax.generate.inputs import BadLine, SamplingDefaults, encode_requests, parse_input
from atom_jax.generate.loop import EngineBroken, run_requests
from atom_jax.generate.outputs import ResultWriter, prepare_output, scan_output
from atom_jax.generate.report import Progress, RunStats, summary_text, write_summary_json

MAX_BAD_LINES_SHOWN = 100


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m atom_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the embedded tiny model trained on stdlib "
                    "docstrings; 'random': the same shapes with random weights)")
    ap.add_argument("--input", required=True, help="input JSONL")
    ap.add_argument("--output", required=True, help="output JSONL (appended to; existing ids are skipped)")
    g = ap.add_argument_group("sampling defaults (a line's own fields win)")
    g.add_argument("--max-tokens", type=_positive_int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None,
                   help="base seed: each request without its own seed gets one derived from this and its id "
                        "(reproducible across reruns)")
    g = ap.add_argument_group("engine (defaults: EngineConfig's)")
    g.add_argument("--dp", type=int)
    g.add_argument("--tbo", choices=("on", "off", "auto"))
    g.add_argument("--tbo-min-tokens", type=int)
    g.add_argument("--moe-backend", choices=MOE_BACKENDS, help="routed-expert grouped GEMM (default auto)")
    g.add_argument("--delayer", choices=("off", "on", "coalesce", "auto"))
    g.add_argument("--num-slots", type=int)
    g.add_argument("--num-pages", type=int)
    g.add_argument("--page-tokens", type=int)
    g.add_argument("--max-pages-per-seq", type=int)
    g.add_argument("--max-tokens-per-step", type=int)
    g.add_argument("--chunk-size", type=int)
    g.add_argument("--buckets", type=_int_list, help="comma-separated step sizes, e.g. 64,128,256")
    g.add_argument("--dtype")
    g.add_argument("--compilation-cache-dir", help="persistent XLA compilation cache (faster restarts)")
    g = ap.add_argument_group("run")
    g.add_argument("--max-in-flight", type=_positive_int,
                   help="requests held by the engine at once (default: 2 x dp x num_slots)")
    g.add_argument("--strict", action="store_true", help="run nothing if any input line is bad")
    g.add_argument("--retry-errors", action="store_true",
                   help="rerun ids whose earlier result was finish_reason error (their old lines are removed)")
    g.add_argument("--summary-json", help="also write the summary here")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--fsync-interval", type=float, default=5.0, help="seconds between fsyncs of the output")
    g.add_argument("--profile", metavar="DIR",
                   help="write a jax.profiler trace of the first model steps here "
                        "(read it with: python -m atom_jax.trace report DIR)")
    g.add_argument("--profile-steps", type=_positive_int, default=5, metavar="N",
                   help="model steps to trace with --profile (default 5)")
    add_distributed_args(ap)
    return ap


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an int > 0, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def engine_config(args):
    from atom_jax.engine import EngineConfig

    names = ("dp", "tbo_min_tokens", "delayer", "num_slots", "num_pages", "page_tokens", "max_pages_per_seq",
             "max_tokens_per_step", "chunk_size", "buckets", "dtype", "compilation_cache_dir", "moe_backend")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.tbo is not None:
        given["tbo"] = {"on": True, "off": False, "auto": None}[args.tbo]
    return EngineConfig(model=args.model, **given)


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
    try:
        dist = resolve_distributed(args) if engine is None else None
    except ValueError as e:
        _log(str(e))
        return 1
    if dist is not None:
        return _main_multihost(args, dist)
    return _main(args, engine)


def _main_multihost(args, dist) -> int:
    """Every process builds the engine over all hosts' devices; process 0 runs the batch and
    the others run its steps until it is done."""
    from atom_jax.distributed import initialize
    from atom_jax.engine import Engine

    cluster = initialize(dist)
    import jax

    args.dp = args.dp or jax.device_count()
    role = "runs the batch" if cluster.is_leader else "follows process 0"
    _log(f"process {cluster.process_id} of {cluster.num_processes} {role} (dp={args.dp})")
    try:
        engine = Engine(engine_config(args), cluster=cluster)
    except Exception as e:
        _log(f"could not start the engine: {e!r}")
        return 1
    if not cluster.is_leader:
        steps = cluster.follow()
        _log(f"process {cluster.process_id}: done after {steps} steps")
        return 0
    try:
        return _main(args, engine)
    finally:
        engine.close()  # release the other processes


def _main(args, engine) -> int:
    t_start = time.monotonic()
    stats = RunStats()
    if not os.path.isfile(args.input):
        _log(f"no such input file: {args.input}")
        return 1
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        _log("--input and --output are the same file")
        return 1
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
        from atom_jax.engine import Engine

        _log(f"loading {'model ' + args.model if args.model else 'the embedded model'} ...")
        try:
            engine = Engine(engine_config(args))
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
    prepare_output(args.output, existing, args.retry_errors)
    if parsed.skipped:
        _log(f"{parsed.skipped} id(s) already in {args.output}: skipped")
    rc = 0
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
