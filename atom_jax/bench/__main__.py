"""`python -m atom_jax.bench <subcommand>`. Each subcommand lives in its own module with an
`add_parser(subparsers)` that sets a `func` default; only the module of the command being run
is imported (the `serve` client, `sim` and `tbo-model` stay jax-free)."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module (in --help order)
COMMANDS = {
    "sim": "atom_jax.bench.sim",
    "serve": "atom_jax.bench.serve_client",
    "gemm": "atom_jax.bench.gemm",
    "gemm-compare": "atom_jax.bench.gemm_compare",
    "w4a16": "atom_jax.bench.w4a16",
    "memory": "atom_jax.bench.memory",
    "fp8": "atom_jax.bench.fp8",
    "dp-step": "atom_jax.bench.dp_step",
    "tbo-model": "atom_jax.bench.tbo_model",
    "engine-step": "atom_jax.bench.engine_step",
    "engine": "atom_jax.bench.engine",
    "engine-delayer": "atom_jax.bench.engine_delayer",
    "decode": "atom_jax.bench.decode",
    "sampler": "atom_jax.bench.sampler",
    "hlo-ops": "atom_jax.bench.hlo_ops",
    "long-context": "atom_jax.bench.long_context",
    "indexer": "atom_jax.bench.indexer",
    "attention": "atom_jax.bench.attention",
    "prefix": "atom_jax.bench.prefix",
    "sass": "atom_jax.bench.sass",
    "mhc": "atom_jax.bench.mhc",
}


def build_parser(commands=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.bench",
                                     description="atom_jax benchmarks: " + ", ".join(COMMANDS))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands or COMMANDS:
        importlib.import_module(COMMANDS[name]).add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
