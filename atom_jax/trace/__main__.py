"""``python -m atom_jax.trace <subcommand>``.

Subcommands:
  hlo     collective/GEMM overlap check over scheduled HLO (a saved file or a --module build)
  report  per-device summary of a jax.profiler trace directory (step time, categories,
          communication overlapped vs exposed, mb_a/mb_b attribution, top kernels)
  plot    timeline PNG of one step: compute and communication lanes per device

Each subcommand registers itself through an ``_add_<name>_parser`` function below, so
more can be added without touching the existing ones.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _load_target(spec: str):
    """'pkg.mod:function' -> function() which must return (fn, args)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"--module wants 'pkg.mod:function', got {spec!r}")
    built = getattr(importlib.import_module(module_name), attr)()
    fn, args = built
    return fn, tuple(args)


def _run_hlo(ns: argparse.Namespace) -> int:
    from atom_jax.trace.hlo import MOE_KINDS, analyze_hlo, compiled_text

    if (ns.file is None) == (ns.module is None):
        raise SystemExit("give exactly one of FILE or --module")
    if ns.module is not None:
        fn, args = _load_target(ns.module)
        text = compiled_text(fn, *args)
        if ns.save_hlo:
            Path(ns.save_hlo).write_text(text)
    else:
        text = Path(ns.file).read_text()

    report = analyze_hlo(text)
    print(report.format_table())
    if ns.json:
        Path(ns.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    if ns.require_overlap:
        exposed = report.not_overlapped(MOE_KINDS, min_bytes=ns.min_bytes)
        if exposed:
            names = ", ".join(f"{c.kind}:{c.name}" for c in exposed)
            print(f"FAIL: {len(exposed)} MoE collective(s) not overlapped with a GEMM: {names}",
                  file=sys.stderr)
            return 1
        print("OK: no MoE collective is left without a GEMM to overlap")
    return 0


def _add_hlo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hlo",
        help="check that async collectives overlap GEMMs in scheduled HLO",
        description="Analyze scheduled HLO (compiled.as_text()) for collective/GEMM overlap.",
    )
    p.add_argument("file", nargs="?", help="saved HLO text (jax ... .compile().as_text()); "
                   "give it or --module (default: none)")
    p.add_argument("--module", help="pkg.mod:function returning (fn, args); compiled here "
                   "(default: none)")
    p.add_argument("--save-hlo", metavar="OUT", help="with --module: also write the HLO text "
                   "(default: not written)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON (default: not written)")
    p.add_argument("--require-overlap", action="store_true",
                   help="exit 1 if any all-gather/reduce-scatter/all-reduce is not overlapped "
                        "(default: report only)")
    p.add_argument("--min-bytes", type=int, default=0,
                   help="with --require-overlap: ignore collectives smaller than this (default: 0)")
    p.set_defaults(func=_run_hlo)


def _run_report(ns: argparse.Namespace) -> int:
    from atom_jax.trace.report import format_report, report

    rep = report(ns.dir, top=ns.top, steps=ns.steps)
    print(format_report(rep))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0 if rep["devices"] else 1


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarise a profiler trace per device",
        description="Summarise the newest trace under DIR (jax.profiler.start_trace log dir).",
    )
    p.add_argument("dir", help="trace log dir, a plugins/profile/<run> dir, or an xplane/json file")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON (default: not written)")
    p.add_argument("--top", type=int, default=10, help="kernels to list per device (default: 10)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps in the capture when it has no step annotations (default: the "
                        "capture's distinct executions)")
    p.set_defaults(func=_run_report)


PLOT_INSTALL = "pip install 'atom_jax[trace]'  (or: pip install matplotlib)"


def _run_plot(ns: argparse.Namespace) -> int:
    from atom_jax.trace.plot import plot_timeline

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"trace plot needs matplotlib, which is not installed: {PLOT_INSTALL}",
              file=sys.stderr)
        return 2
    out = plot_timeline(ns.dir, ns.output, step=ns.step)
    print(f"wrote {out}")
    return 0


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="timeline PNG of one step (compute / communication lane per device)",
        description="Plot one step of the newest trace under DIR (needs matplotlib: "
                    f"{PLOT_INSTALL}).",
    )
    p.add_argument("dir", help="trace log dir, a plugins/profile/<run> dir, or an xplane/json file")
    p.add_argument("-o", "--output", default="timeline.png",
                   help="PNG to write (default: timeline.png)")
    p.add_argument("--step", type=int, default=None,
                   help="annotated step_num to draw (default: the last step)")
    p.set_defaults(func=_run_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.trace")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_hlo_parser(sub)
    _add_report_parser(sub)
    _add_plot_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
