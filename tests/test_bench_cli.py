"""`python -m atom_jax.bench`: every subcommand is reachable from the one entry point, and only
the chosen command's module is imported (the HTTP client and the simulator stay jax-free)."""

from __future__ import annotations

import subprocess
import sys

from atom_jax.bench.__main__ import COMMANDS, build_parser


def test_every_command_parses_its_own_flags():
    parser = build_parser()
    for name in COMMANDS:
        args = parser.parse_args([name, "--json", "x.json"] if name != "serve" else [name])
        assert args.command == name and callable(args.func)


def test_only_the_chosen_command_is_imported():
    code = ("import sys; from atom_jax.bench.__main__ import build_parser; build_parser(['sim', 'serve']); "
            "print('jax' in sys.modules, 'atom_jax.bench.dp_step' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
