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


def test_best_time_warms_up_then_takes_the_fastest_batch():
    """`best_time` (the ceilings' timer): calls fn for at least warmup_s first (2 calls at least),
    then returns the per-call time of the fastest of `repeats` back-to-back batches, not their
    median."""
    import time

    from atom_jax.bench.timing import best_time

    calls = []
    sleeps = [0.0, 0.0] + [0.004] * 3 + [0.001] * 3 + [0.004] * 3  # 2 warm-up calls, then batch 1 is the fast one

    def fn(_):
        calls.append(time.perf_counter())
        time.sleep(sleeps[len(calls) - 1])
        return 0

    best = best_time(fn, iters=3, repeats=3)
    assert len(calls) == 11 and 0.0009 < best < 0.0025  # batch 1's ~1 ms a call, not the median batch's ~4 ms
    calls.clear()
    sleeps[:] = [0.0] * 100000
    t0 = time.perf_counter()
    best_time(fn, iters=3, repeats=3, warmup_s=0.05)
    assert calls[-9] - t0 >= 0.05 and calls[-10] - t0 < 0.055  # the 9 timed calls start once 0.05 s of calls ran
