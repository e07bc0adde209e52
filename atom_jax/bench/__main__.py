"""`python -m atom_jax.bench <subcommand>`. Subcommands register themselves on the parser
(`add_parser(subparsers)` + a `func` default), so `serve` and others can be added later."""

from __future__ import annotations

import argparse
import sys

from atom_jax.bench import serve_client, sim, w4a16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.bench",
                                     description="atom_jax benchmarks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim.add_parser(sub)
    serve_client.add_parser(sub)
    w4a16.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
