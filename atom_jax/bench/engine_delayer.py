"""`python -m atom_jax.bench engine-delayer`: the real engine on a random workload,
PrefillDelayer off vs on vs coalesce, in one run (one compiled engine; the scheduler is reset
between modes). A preset of `bench engine` (atom_jax/bench/engine.py, which runs and reports
it): the `mid` V4-shaped model (`--tiny`: the tiny one), 32 slots of 12 pages of 128 tokens
per rank, a 1024-token step budget and chunk, TBO from 1024 tokens per rank.

    python -m atom_jax.bench engine-delayer --dp 2 --num-prompts 64 --input-len 1024 --output-len 128

Arrivals: Poisson at --request-rate requests/s (wall clock, bench_serving's request-rate
mode; `inf` queues everything at t=0), at most --max-concurrency in flight, the same arrival
times and prompts for every mode; input and output lengths uniform in [len * range_ratio, len].
Every bucket is compiled first (Engine.warmup), so no compile lands in a timed run."""

from __future__ import annotations

import argparse
import math

from atom_jax.bench import engine as engine_bench


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("engine-delayer", help="the real engine, PrefillDelayer off/on/coalesce",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    ap.add_argument("--moe-backend", default=None, help="default: ragged_dot on CPU, pallas on GPU")
    ap.add_argument("--modes", default="off,on,coalesce")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def engine_argv(args) -> list[str]:
    """The `bench engine` command line this preset stands for."""
    argv = ["engine", "--preset", "tiny" if args.tiny else "mid", "--dp", str(args.dp),
            "--num-slots", "32", "--num-pages", str(32 * 12), "--page-tokens", "128", "--max-pages-per-seq", "12",
            "--max-tokens-per-step", "1024", "--chunk-size", "1024", "--buckets", "32,64,128,256,512,1024",
            "--tbo-min-tokens", "1024", "--moe-backend", args.moe_backend or ("ragged_dot" if args.tiny else "pallas"),
            "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", str(args.range_ratio),
            "--max-concurrency", str(args.max_concurrency), "--request-rate", str(args.request_rate),
            "--delayer-modes", args.modes, "--workload-seed", "0"]
    return argv + (["--json", args.json] if args.json else [])


def run_cli(args) -> int:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.bench")
    engine_bench.add_parser(parser.add_subparsers())
    return engine_bench.run_cli(parser.parse_args(engine_argv(args)))
