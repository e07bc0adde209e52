"""`python -m atom_jax.bench sim`: replay a bench_serving-style request stream through the real
DPScheduler with a modelled step time (cost_model.py) and no model; tokens are dummy ids.

Clock: modelled seconds. Each step advances it by the cost model; arrivals up to the current
time are added before the step is planned; when nothing is queued it jumps to the next
arrival. With --max-concurrency, at most C requests are in flight and TTFT counts from when a
request is issued (as bench_serving's semaphore does).

Padding waste is reported token-weighted (padded slots / all slots over the run: the fraction
of step compute spent on padding) and as a plain mean over steps.

Results with the default cost model and scheduler (64 slots, 2048-token budget and chunk),
`--dp 8 --random-input-len 2048 --random-output-len 256 --random-range-ratio 0.5 --seed 1
--num-prompts 768` (8K/1K scaled by 1/4):

    load                      waste off / on / coalesce    output tok/s off / on / coalesce
    --max-concurrency 256     71% / 23% / 19%              6495 / 10753 / 10968
    --request-rate 40         73% / 29% / 24%              6631 / 6607 / 6606 (arrival-bound)
    --request-rate 10         88% / 65% / 65%              1842 / 1838 / 1838 (arrival-bound)

At light load the gate cannot align ranks within 30 ticks (few arrivals per window: mostly
timeouts), so it does not halve waste there; it costs about 190 ms of mean TTFT.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import time

import numpy as np

from atom_jax.bench.cost_model import StepCostModel
from atom_jax.bench.workload import SimRequest, random_requests
from atom_jax.engine.args import positive_int
from atom_jax.scheduler import (DPScheduler, RankConfig, SamplingParams, Sequence,
                                make_delayer)

MODES = ("off", "on", "coalesce")
DUMMY_TOKEN = 0  # never an EOS id here: requests run to their output length


def simulate(requests: list[SimRequest], *, dp: int, mode: str, rank_config: RankConfig,
             buckets=None, tbo_min_tokens: int | None = 1024, cost: StepCostModel | None = None,
             max_concurrency: int | None = None, delayer_kwargs: dict | None = None,
             max_ticks: int | None = None) -> dict:
    """Run one mode over `requests`; returns the result dict (see `summarize`)."""
    cost = cost or StepCostModel()
    # dummy token ids make every prompt the same to a prefix cache: lengths only, no reuse
    rank_config = dataclasses.replace(rank_config, enable_prefix_caching=False)
    sched = DPScheduler(dp, rank_config, buckets, make_delayer(mode, **(delayer_kwargs or {})),
                        tbo_min_tokens)
    pending = collections.deque(sorted(requests, key=lambda r: r.arrival_time))
    issued, first_tok, done = {}, {}, {}
    in_flight, now = 0, 0.0
    max_ticks = max_ticks or 50 * sum(r.input_len + r.output_len for r in requests) + 10_000

    def record_finished(seqs):
        nonlocal in_flight
        for s in seqs:
            done[s.request_id] = (now, s.finish_reason, s.num_output_tokens)
            in_flight -= 1

    while len(done) < len(requests):
        while pending and pending[0].arrival_time <= now and (
                max_concurrency is None or in_flight < max_concurrency):
            r = pending.popleft()
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            sched.add(Sequence(r.request_id, [1] * r.input_len, params, arrival_time=now))
            issued[r.request_id] = now
            in_flight += 1
        record_finished(sched.pop_finished())  # requests that can never fit fail on add
        if not sched.has_work():
            if not pending:
                break
            now = max(now, pending[0].arrival_time)
            continue
        if sched.metrics.ticks >= max_ticks:
            raise RuntimeError(f"simulation ({mode}) did not finish in {max_ticks} ticks")
        plan = sched.schedule()
        now += cost.step_time(plan)
        if plan.is_empty:
            continue  # the engine skips the model on an empty tick
        sampled = {c.request_id: DUMMY_TOKEN for w in plan.per_rank for c in w if c.sample}
        out = sched.on_step_done(plan, sampled)
        for seq, _ in out.new_tokens:
            first_tok.setdefault(seq.request_id, now)
        record_finished(out.finished)

    sched.check_invariants()
    return summarize(requests, sched, issued, first_tok, done, now)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(requests, sched: DPScheduler, issued, first_tok, done, duration) -> dict:
    ok = [r for r in requests if done.get(r.request_id, (0, None))[1] in ("stop", "length")]
    ttft = [first_tok[r.request_id] - issued[r.request_id] for r in ok]
    tpot = [(done[r.request_id][0] - first_tok[r.request_id]) / (done[r.request_id][2] - 1)
            for r in ok if done[r.request_id][2] > 1]
    out_tokens = sum(done[r.request_id][2] for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    m = sched.metrics.snapshot()
    duration = max(duration, 1e-12)
    return {
        "completed": len(ok),
        "failed": len(requests) - len(ok),
        "duration_s": duration,
        "padding_waste": m["padding_waste"],
        "mean_step_padding_waste": m["mean_step_padding_waste"],
        "steps": m["steps"],
        "idle_ticks": m["idle_ticks"],
        "modelled_throughput_tok_s": out_tokens / duration,
        "total_throughput_tok_s": (in_tokens + out_tokens) / duration,
        "request_throughput": len(ok) / duration,
        "mean_ttft_ms": 1e3 * float(np.mean(ttft)) if ttft else float("nan"),
        "median_ttft_ms": 1e3 * _pct(ttft, 50),
        "p99_ttft_ms": 1e3 * _pct(ttft, 99),
        "mean_tpot_ms": 1e3 * float(np.mean(tpot)) if tpot else float("nan"),
        "p99_tpot_ms": 1e3 * _pct(tpot, 99),
        "delayer": m["delayer"],
        "wait_passes_total": m["wait_passes_total"],
        "wait_passes_max": m["wait_passes_max"],
        "tbo_on_steps": m["tbo_on_steps"],
        "tbo_off_steps": m["tbo_off_steps"],
        "prefill_tokens": m["prefill_tokens"],
        "decode_tokens": m["decode_tokens"],
        "num_preemptions": m["num_preemptions"],
        "bucket_steps": m["bucket_steps"],
    }


# -- command line -------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sim", help="replay a random request stream through the scheduler (no model)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=positive_int, default=8)
    p.add_argument("--delayer", choices=MODES, default="on")
    p.add_argument("--compare", action="store_true",
                   help="run off, on and coalesce on the same arrivals and compare")
    w = p.add_argument_group("workload (bench_serving `random` dataset)")
    w.add_argument("--num-prompts", type=positive_int, default=512)
    w.add_argument("--random-input-len", type=positive_int, default=1024)
    w.add_argument("--random-output-len", type=positive_int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per modelled second (default inf: all at once)")
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--seed", type=int, default=1)
    s = p.add_argument_group("scheduler (per rank)")
    d = RankConfig()
    s.add_argument("--num-slots", type=positive_int, default=d.num_slots)
    s.add_argument("--num-pages", type=positive_int, default=d.num_pages)
    s.add_argument("--page-tokens", type=positive_int, default=d.page_tokens)
    s.add_argument("--max-tokens-per-step", type=positive_int, default=d.max_tokens_per_step)
    s.add_argument("--chunk-size", type=positive_int, default=d.chunk_size)
    s.add_argument("--buckets", type=str, default=None, help="comma list; default powers of 2")
    s.add_argument("--tbo-min-tokens", type=positive_int, default=1024)
    g = p.add_argument_group("prefill gate")
    g.add_argument("--max-delay-passes", type=int, default=30, help="on: delay limit (ticks)")
    g.add_argument("--low-watermark", type=float, default=None,
                   help="on: a ready rank under this KV usage forces allow (default off)")
    g.add_argument("--target-fraction", type=float, default=0.75,
                   help="coalesce: fire when ready prefill fills this much of the budget")
    g.add_argument("--max-wait-ticks", type=int, default=30, help="coalesce: wait limit")
    g.add_argument("--high-watermark", type=float, default=None,
                   help="coalesce: a ready rank at this KV usage ends the wait (default off)")
    c = p.add_argument_group("step cost model (seconds; see atom_jax/bench/cost_model.py)")
    cm = StepCostModel()
    c.add_argument("--cost-a", type=float, default=cm.a)
    c.add_argument("--cost-b", type=float, default=cm.b)
    c.add_argument("--cost-c", type=float, default=cm.c)
    c.add_argument("--tbo-factor", type=float, default=cm.tbo_factor)
    c.add_argument("--idle-tick", type=float, default=cm.idle_tick)
    c.add_argument("--calibration", nargs="+", default=None, metavar="FILE",
                   help="`bench dp-step --json` outputs (or calibration JSON): step times from the "
                        "step model fitted to them (bench tbo-model) at --dp, replacing --cost-a, "
                        "--cost-b and --tbo-factor; with several models' files, --calibration-model "
                        "picks one")
    c.add_argument("--calibration-model", default=None, help="preset name among the calibrated models")
    p.add_argument("--json", type=str, default=None, help="write results to this path")
    p.set_defaults(func=run_cli)
    return p


def calibrated_step_model(paths, name: str | None = None):
    """The step model fitted to these calibration files (one model's dims, or `name`)."""
    from atom_jax.bench.tbo_model import fit_calibration, load_calibrations
    models = [fit_calibration(c) for c in load_calibrations(paths)]
    if name:
        models = [m for m in models if m.dims.name == name]
    if len(models) != 1:
        raise SystemExit(f"--calibration gives {len(models)} models"
                         f"{' named ' + name if name else ''}; pick one with --calibration-model")
    return models[0]


def run_from_args(args) -> dict:
    """Build the workload from parsed args and run one mode (or all with --compare)."""
    requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.request_rate, args.seed)
    rank_config = RankConfig(num_slots=args.num_slots, num_pages=args.num_pages,
                             page_tokens=args.page_tokens,
                             max_tokens_per_step=args.max_tokens_per_step,
                             chunk_size=args.chunk_size)
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else None
    cost = StepCostModel(args.cost_a, args.cost_b, args.cost_c, args.tbo_factor, args.idle_tick)
    if args.calibration:
        cost = StepCostModel.calibrated(calibrated_step_model(args.calibration, args.calibration_model),
                                        args.dp, c=args.cost_c, idle_tick=args.idle_tick)
    gate = dict(max_delay_passes=args.max_delay_passes, low_watermark=args.low_watermark,
                target_fraction=args.target_fraction, max_wait_ticks=args.max_wait_ticks,
                high_watermark=args.high_watermark)
    runs = {}
    for mode in (MODES if args.compare else (args.delayer,)):
        t0 = time.perf_counter()
        runs[mode] = simulate(requests, dp=args.dp, mode=mode, rank_config=rank_config,
                              buckets=buckets, tbo_min_tokens=args.tbo_min_tokens, cost=cost,
                              max_concurrency=args.max_concurrency, delayer_kwargs=gate)
        runs[mode]["sim_cpu_s"] = time.perf_counter() - t0
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if math.isinf(args.request_rate):
        config["request_rate"] = "inf"
    if not args.compare:
        return {"mode": args.delayer, **runs[args.delayer], "config": config}
    return {"padding_waste": {m: r["padding_waste"] for m, r in runs.items()},
            "runs": runs, "config": config}


_ROWS = [
    ("padding waste (token-weighted)", "padding_waste", "{:.1%}"),
    ("mean per-step padding waste", "mean_step_padding_waste", "{:.1%}"),
    ("steps", "steps", "{}"),
    ("idle ticks", "idle_ticks", "{}"),
    ("modelled duration (s)", "duration_s", "{:.2f}"),
    ("output throughput (tok/s)", "modelled_throughput_tok_s", "{:.0f}"),
    ("total throughput (tok/s)", "total_throughput_tok_s", "{:.0f}"),
    ("mean TTFT (ms)", "mean_ttft_ms", "{:.0f}"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "{:.0f}"),
    ("mean TPOT (ms)", "mean_tpot_ms", "{:.1f}"),
    ("TBO on / off steps", ("tbo_on_steps", "tbo_off_steps"), "{} / {}"),
    ("delay / timeout / watermark / stall", ("delayer",), None),
    ("max wait (ticks)", "wait_passes_max", "{}"),
    ("preemptions", "num_preemptions", "{}"),
    ("completed / failed", ("completed", "failed"), "{} / {}"),
    ("simulator CPU (s)", "sim_cpu_s", "{:.1f}"),
]


def format_table(runs: dict) -> str:
    modes = list(runs)
    lines = [f"{'':38}" + "".join(f"{m:>16}" for m in modes)]
    for label, key, fmt in _ROWS:
        cells = []
        for m in modes:
            r = runs[m]
            if key == ("delayer",):
                d = r["delayer"]
                cells.append(f"{d['delay']}/{d['timeout']}/{d['watermark']}/{d['stall']}")
            elif isinstance(key, tuple):
                cells.append(fmt.format(*(r[k] for k in key)))
            else:
                cells.append(fmt.format(r[key]) if key in r else "-")
        lines.append(f"{label:38}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def run_cli(args) -> int:
    result = run_from_args(args)
    runs = result["runs"] if args.compare else {args.delayer: result}
    print(format_table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0
