"""`python -m atom_jax.bench decode`: decode speed of the real Engine with the overlap schedule
off, on, and on with the dispatch thread (`--dispatch-thread`), in one run (one engine, one set of compiled programs; the scheduler is reset
between cases).

    python -m atom_jax.bench decode --layers 4 --batches 1,64 --trace /tmp/decode_trace   # 1x GPU
    python -m atom_jax.bench decode --dp 2 --layers 4 --batches 64 --trace /tmp/dp2_trace  # 2x GPU
    python -m atom_jax.bench decode --tiny --batches 1,8 --steps 16                        # CPU smoke

For each batch (sequences per rank) and mode: `batch x dp` requests of --prompt-len random
tokens are prefilled, then --steps decode steps are timed (after --warmup untimed ones, which
also compile the decode bucket): ms per step (batch 1: ms per token) and output tokens/s, and the host's
ms per step by phase (`Engine.host_times`: schedule, pack, dispatch, wait on the device,
resolve, outputs; "host" is all but the wait).
With --replay N, each case ends with device-side probes over the last timed step's inputs,
without the engine loop: `replay_run` dispatches the runner's step N times (packing, copy, call)
and `replay_call` calls the compiled program N times with one packed numpy input block (the
call copies it, as in the engine), `replay_call_placed` the same with the block placed by a
device_put from Python before each call; none reads a token; then one wait for the device. Their ms per step against the loop's and the trace's busy
time say whether the gap is the engine's host work (replay near the busy time) or the launch
itself (replay near the loop's step): `replay_call_launch_ms` is the mean wall time of one call's
return, i.e. how long the host blocks while the program's kernels are enqueued. Calls made back
to back can also block because the device is behind (its launch queues full), so two more
probes split the launch: `replay_idle_launch_ms`, one call's return with the device idle (a wait
before each call, not timed): the host's own cost of the launch; `replay_args_launch_ms`, one
call of a program of ONE small kernel over the same arguments (the weights, the cache, the page
table, the last output and the numpy block, none dropped): what the arguments alone cost the
dispatch. Idle minus args is XLA enqueueing the step's kernels; call minus idle is waiting for
the device. And two that read tokens as the loops do, without the scheduler: `replay_read_ms`,
ms per step of n dispatches through `runner.run`, each followed by reading the tokens of the one
before it (the overlap loop's pattern), `replay_sync_ms` each followed by reading its own (the
synchronous loop's). Read near run and the loop far above: the engine's own host work is what
the loop adds; read near the loop: reading the tokens is.
--decode-topk auto,rowselect builds the step programs once per indexer top-k policy of decode
steps (`models/index_topk.AUTO_POLICY`, what `auto` runs up to AUTO_MAX_TOKENS tokens per step;
it matters on CSA layers once the context passes one rung, 16K tokens: use --prompt-len 32768 or
more; there `auto` runs the switch-free "flat", a named policy its rung switch, AUTO_SWITCH_FREE) and runs every case with each; rows are labelled command buffers/policy.
--command-buffers xla,off compiles the step with and without XLA's GPU command buffers (CUDA
graphs) and runs every case with each (a jax.profiler trace turns command buffers off unless
XLA_FLAGS has --xla_enable_command_buffers_during_profiling=true, so a traced step shows the "off" launch).
With --trace, a jax.profiler trace of --trace-steps more decode steps per case is read with
`atom_jax.trace.report`: device-busy time per step over the annotated step time (the overlap
schedule annotates a whole engine iteration, so steps tile the timeline); with command buffers
also the busy time of one graph launch of the step program (the step's whole work, wherever the
annotations fall) over the untraced loop's ms per step ("busy/launch", "of loop"). Weights are random
bf16 at V4-Flash layer dims (float32 tiny model with --tiny)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax.numpy as jnp
import numpy as np

from atom_jax.engine.host_timing import PHASES
from atom_jax.sharding.placement import place

MODES = ("off", "on", "thread")
# environment variables recorded in the JSON: XLA's flags, and the PJRT GPU client's choice
# (XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=1: the TFRT client, which enqueues a program's kernels
# from its own thread per device instead of the calling one)
ENV_RECORDED = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT", "XLA_PYTHON_CLIENT_ALLOCATOR")


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("decode", help="decode ms/token and tok/s of the real Engine, overlap schedule off "
                               "vs on, with device-busy share from a trace", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,64", help="decoding sequences per rank, comma list")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per case")
    ap.add_argument("--warmup", type=int, default=8, help="untimed decode steps before timing")
    ap.add_argument("--modes", default="off,on,thread",
                    help="loops to run, in order: off (synchronous), on (overlap schedule), thread "
                    "(overlap schedule with the dispatch thread)")
    ap.add_argument("--command-buffers", default="xla", metavar="LIST",
                    help="comma list of the step program's XLA GPU command buffers (xla: XLA's default "
                    "CUDA graphs, off: none); each is compiled and warmed in turn, then every case runs")
    ap.add_argument("--decode-topk", default="auto", metavar="LIST",
                    help="comma list of the indexer top-k policies decode steps run (auto: the default, "
                    "models/index_topk.AUTO_POLICY); each builds the step programs again (see above)")
    ap.add_argument("--replay", type=int, default=0, metavar="N",
                    help="after each case, time N dispatches of its last step without the engine loop (see above)")
    ap.add_argument("--trace", default=None, metavar="DIR", help="also trace each case into DIR/<mode>_b<batch>")
    ap.add_argument("--trace-steps", type=int, default=12)
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--expert-layout", default="auto", help="the random bf16 experts' layout (weights.formats: "
                    "nmajor, kmajor, auto = the engine's choice for bf16 experts on this platform)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model in float32 (CPU smoke run)")
    ap.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                    help="the engine's prefix cache (on: the default, its per-page state work included)")
    ap.add_argument("--json", default=None)
    ap.set_defaults(func=run_cli)
    return ap


def _engine(args, batches):
    from atom_jax.config import tiny, v4_flash
    from atom_jax.engine import Engine, EngineConfig
    from atom_jax.loader import random_model

    cfg = tiny() if args.tiny else v4_flash(num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    import jax

    from atom_jax.weights.formats import BF16, resolve_layout
    try:
        layout = resolve_layout(args.expert_layout, jax.default_backend(), BF16)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = random_model(cfg, seed=0, dtype=dtype, expert_layout=layout)
    page_tokens = 128
    slots = max(batches)
    chunk = min(args.prompt_len, 2048)
    budget = max(chunk, slots)
    per_seq = -(-(args.prompt_len + _max_tokens(args, slots * args.dp, budget)) // page_tokens)
    buckets = tuple(sorted(set(batches) | {budget}))
    ec = EngineConfig(dp=args.dp, dtype=str(jnp.dtype(dtype)), num_slots=slots, page_tokens=page_tokens,
                      num_pages=slots * per_seq + 1, max_model_len=per_seq * page_tokens,
                      max_tokens_per_step=budget, chunk_size=chunk, buckets=buckets, tbo=False,
                      moe_backend=args.moe_backend, compilation_cache_dir=None,
                      enable_prefix_caching=args.prefix_caching == "on")
    return Engine(ec, model=model, tokenizer=None), cfg, layout


def _max_tokens(args, n: int, budget: int) -> int:
    """max_tokens of each of `n` requests prefilled at `budget` tokens per step: the timed and
    untimed decode steps, plus one token per prefill step (sequences prefilled early decode while
    the later ones prefill; the pages per sequence are sized from this too)."""
    prefill_steps = -(-n * args.prompt_len // budget) + n
    return args.warmup + args.steps + (args.trace_steps + 1 if args.trace else 0) + 4 + prefill_steps


def _steps(engine, n: int, times: list | None = None) -> int:
    """Run `n` engine iterations; -> output tokens they returned. `times` gets each iteration's
    wall seconds (a mean hides a single long step: a collector pause, a page-table regrowth)."""
    out = 0
    for _ in range(n):
        t0 = time.perf_counter()
        out += sum(len(o.new_token_ids) for o in engine.step())
        if times is not None:
            times.append(time.perf_counter() - t0)
    return out


def _step_spread(times: list) -> dict:
    """Median, p90 and max of the timed iterations (ms), beside the mean `ms_per_step`."""
    ms = np.sort(np.asarray(times) * 1e3)
    return {"ms_per_step_median": round(float(np.median(ms)), 3),
            "ms_per_step_p90": round(float(np.percentile(ms, 90)), 3), "ms_per_step_max": round(float(ms[-1]), 3)}


class _LastInputs:
    """Wraps `runner.prepare` (every loop's, the dispatch thread's too) during the timed steps
    and keeps the last step's inputs."""

    def __init__(self, runner):
        self.runner, self.inputs, self._prepare = runner, None, runner.prepare

    def __enter__(self):
        def prepare(inputs):
            self.inputs = inputs
            return self._prepare(inputs)
        self.runner.prepare = prepare
        return self

    def __exit__(self, *exc):
        del self.runner.prepare  # the bound method again


def replay(runner, inputs, n: int) -> dict:
    """ms per step of n dispatches of `inputs` through `runner.run` (pack, copy, call), then of n
    calls of the compiled program on one packed input block (each call copies it, as in a
    step); no token read, one wait at the end.
    The cache and the last output advance as in real steps (the same rows rewritten), so the
    engine goes on afterwards with the same pages; only its random-weight tokens differ."""
    import jax

    jax.block_until_ready(runner._last_out)
    t0 = time.perf_counter()
    for _ in range(n):
        runner.run(inputs)
    jax.block_until_ready(runner._last_out)
    run_ms = 1e3 * (time.perf_counter() - t0) / n
    buf = runner._input_block(inputs, runner._no_updates)  # numpy, as `prepare` hands it to the call
    call_ms, launch_ms = _replay_calls(runner, inputs, n, lambda: buf)
    # the same with the block placed by a device_put from Python first (what `prepare` did
    # before its block went into the call as numpy): which copy is cheaper on this device
    placed_ms, placed_launch_ms = _replay_calls(runner, inputs, n, lambda: place(buf, runner._replicated))
    _, idle_launch_ms = _replay_calls(runner, inputs, n, lambda: buf, idle=True)
    read_ms, sync_ms = _replay_reads(runner, inputs, n, lag=1), _replay_reads(runner, inputs, n, lag=0)
    return {"replay_read_ms": read_ms, "replay_sync_ms": sync_ms, "replay_steps": n, "replay_run_ms": round(run_ms, 3), "replay_call_ms": call_ms,
            "replay_call_launch_ms": launch_ms, "replay_call_placed_ms": placed_ms,
            "replay_call_placed_launch_ms": placed_launch_ms, "replay_idle_launch_ms": idle_launch_ms,
            "replay_args_launch_ms": _args_launch_ms(runner, buf, n)}


def _replay_reads(runner, inputs, n: int, lag: int) -> float:
    """ms per step of n dispatches through `runner.run`, each followed by reading the tokens of
    the dispatch `lag` steps before it (the rest read at the end)."""
    import jax

    jax.block_until_ready(runner._last_out)
    pending = []
    t0 = time.perf_counter()
    for _ in range(n):
        pending.append(runner.run(inputs))
        if len(pending) > lag:
            pending.pop(0).fetch()
    for res in pending:
        res.fetch()
    return round(1e3 * (time.perf_counter() - t0) / n, 3)


def _args_launch_ms(runner, buf, n: int) -> float:
    """Mean ms until one call returns of a one-kernel program over the step's arguments (every
    one passed: keep_unused), the device idle before each call."""
    import jax

    args = (runner.params, runner.cache, runner._page_table_dev, runner._last_out)
    block = jax.ShapeDtypeStruct(buf.shape, buf.dtype, sharding=runner._replicated)
    exe = jax.jit(lambda params, cache, table, last, blk: last + blk[0], keep_unused=True).lower(*args, block).compile()
    times = []
    for _ in range(n + 1):  # the first call sets up the fast path: not counted
        jax.block_until_ready(runner._last_out)
        t0 = time.perf_counter()
        out = exe(*args, buf)
        times.append(time.perf_counter() - t0)
        jax.block_until_ready(out)
    return round(1e3 * statistics.fmean(times[1:]), 3)


def _replay_calls(runner, inputs, n: int, block, idle: bool = False) -> tuple[float, float]:
    """n calls of the step program on `block()` (made inside the timed call) -> (ms per step,
    mean ms until one call returns). idle: wait for the device before each call (so the ms per
    step then includes those waits)."""
    import jax

    launches = []
    t0 = time.perf_counter()
    for _ in range(n):
        if idle:
            jax.block_until_ready(runner._last_out)
        t1 = time.perf_counter()
        runner._last_out = runner.call_program(inputs.bucket, inputs.tbo, block())
        launches.append(time.perf_counter() - t1)
    jax.block_until_ready(runner._last_out)
    call_ms = 1e3 * (time.perf_counter() - t0) / n
    return round(call_ms, 3), round(1e3 * statistics.fmean(launches), 3)


def run_case(engine, vocab: int, batch: int, mode: str, args, rng) -> dict:
    from atom_jax.engine import SamplingParams

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    engine.config.overlap_schedule = mode != "off"
    engine.config.dispatch_thread = mode == "thread"
    engine.reset_scheduler(engine.config.delayer)
    n = batch * engine.config.dp
    # Sequences prefilled early decode while the later ones prefill: each may emit one token per
    # prefill step before the timed part, so max_tokens covers those too, and every sequence is
    # still decoding through the timed steps (else the batch shrinks as early ones finish: with
    # 64 x 32K-token prompts, ~1,000 prefill steps, only a couple were left). Aborted at the end.
    params = SamplingParams(max_tokens=_max_tokens(args, n, engine.config.max_tokens_per_step), ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=list(map(int, rng.integers(2, vocab, args.prompt_len))), params=params)
           for _ in range(n)]
    while engine.scheduler.num_waiting or any(s.is_prefilling for r in engine.scheduler.ranks for s in r.running):
        engine.step()  # prefill (not timed)
    _steps(engine, args.warmup)
    engine.host_times(reset=True)
    times = []
    with _LastInputs(engine.runner) as last:
        t0 = time.perf_counter()
        tokens = _steps(engine, args.steps, times)
        wall = time.perf_counter() - t0
    res = {"mode": mode, "batch_per_rank": batch, "dp": engine.config.dp, "ms_per_step": round(1e3 * wall / args.steps, 3),
           **_step_spread(times), "output_tok_s": round(tokens / wall, 1), "host_ms": engine.host_times(reset=True),
           "tokens_per_step": round(tokens / args.steps, 2)}  # = batch x dp while every sequence decodes
    if args.replay and last.inputs is not None:
        if engine._launcher is not None:  # no launch of the dispatch thread in flight while replaying
            engine._launcher.drain()
        res.update(replay(engine.runner, last.inputs, args.replay))
    if args.trace:
        from atom_jax.trace.report import report

        from atom_jax.models import index_topk

        path = os.path.join(args.trace, f"{mode}_b{batch}_cb{engine.runner.command_buffers}_{index_topk.AUTO_POLICY}")
        engine.start_profile(path, args.trace_steps)
        _steps(engine, args.trace_steps + 1)
        engine.stop_profile()
        rep = report(path)
        devs = list(rep["devices"].values())
        busy = statistics.fmean(d["busy_ms"] for d in devs)
        step = statistics.fmean(d["step_time_ms"] for d in devs)
        shares = [d["busy_share_of_period"] for d in devs if d["busy_share_of_period"] is not None]
        res.update(trace=path, busy_ms_per_step=round(busy, 3), step_ms_traced=round(step, 3),
                   device_busy_share=round(busy / step, 3) if step else None,
                   step_period_ms_traced=round(statistics.fmean(d["step_period_ms"] for d in devs), 3) if shares else None,
                   busy_share_of_period=round(statistics.fmean(shares), 3) if shares else None)
        res.update(_launch_summary([d["launches"] for d in devs if d.get("launches")]))
        runs = [d["executions"] for d in devs if d.get("executions")]
        if runs:  # command buffers: one graph launch per step; its busy time is the step's whole work
            per_launch = statistics.fmean(x["busy_ms"] for x in runs)
            res.update(busy_ms_per_launch=round(per_launch, 3), launch_kernels=runs[0]["kernels"],
                       launch_busy_share_of_untraced_step=round(per_launch / res["ms_per_step"], 3))
    for rid in ids:  # what is left of max_tokens is not measured: abort, so every page is free again
        engine.abort(rid)
    while engine.has_unfinished():  # a step in flight (overlap schedule) completes
        engine.step()
    return res


def _launch_summary(launches: list[dict]) -> dict:
    """Kernels and copies per step, the short ones and per decoder layer (`trace.report`'s
    "launches"), averaged over the devices."""
    if not launches:
        return {}

    def mean(key):
        vals = [la[key] for la in launches if la[key] is not None]
        return round(statistics.fmean(vals), 2) if vals else None

    return {"launches_per_step": mean("per_step"), "short_launches_per_step": mean("short_per_step"),
            "launches_per_layer": mean("per_layer_mean")}


def run_cli(args) -> int:
    import jax

    batches = [int(b) for b in args.batches.split(",") if b]
    engine, cfg, layout = _engine(args, batches)
    from atom_jax.engine.args import COMMAND_BUFFERS

    buffers = [b for b in args.command_buffers.split(",") if b]
    if not buffers or any(b not in COMMAND_BUFFERS for b in buffers):
        raise SystemExit(f"--command-buffers: a comma list of {', '.join(COMMAND_BUFFERS)}")
    from atom_jax.models import index_topk

    policies = [p for p in args.decode_topk.split(",") if p]
    if not policies or any(p not in ("auto", *index_topk.POLICIES) for p in policies):
        raise SystemExit(f"--decode-topk: a comma list of auto, {', '.join(index_topk.POLICIES)}")
    rng = np.random.default_rng(0)
    results, default_policy = [], index_topk.AUTO_POLICY
    switch_free = index_topk.AUTO_SWITCH_FREE  # a named policy runs as named (its rung switch too)
    try:
        for cb in buffers:
            for policy in policies:
                # read when the step is traced: use_command_buffers builds the programs anew
                index_topk.AUTO_POLICY = default_policy if policy == "auto" else policy
                index_topk.AUTO_SWITCH_FREE = switch_free if policy == "auto" else None
                engine.config.command_buffers = cb
                engine.runner.use_command_buffers(cb)
                engine.warmup()  # as `serve` does: every bucket compiled, what is alive then frozen (gc)
                variant = cb if len(policies) == 1 else f"{cb}/{policy}"
                for batch in batches:
                    for mode in args.modes.split(","):
                        res = {**run_case(engine, cfg.vocab_size, batch, mode, args, rng), "command_buffers": cb,
                               "decode_topk": policy, "variant": variant}
                        results.append(res)
                        print(json.dumps(res), flush=True)
    finally:
        index_topk.AUTO_POLICY, index_topk.AUTO_SWITCH_FREE = default_policy, switch_free
    print(f"\n{'variant':>14} {'batch/rank':>10} {'mode':>6} {'ms/step':>9} {'median':>8} {'p90':>8} {'max':>8} {'tok/s':>10} "
          f"{'busy share':>10} {'of period':>10} {'busy/launch':>11} {'of loop':>8}")
    for r in results:  # busy share: of the annotated step; of period: of step start to next start;
        # busy/launch: one graph launch's kernel time (ms), of loop: that over the untraced ms/step
        share, period = r.get("device_busy_share"), r.get("busy_share_of_period")
        launch, of_loop = r.get("busy_ms_per_launch"), r.get("launch_busy_share_of_untraced_step")
        print(f"{r['variant']:>14} {r['batch_per_rank']:>10} {r['mode']:>6} {r['ms_per_step']:>9.3f} {r['ms_per_step_median']:>8.3f} "
              f"{r['ms_per_step_p90']:>8.3f} {r['ms_per_step_max']:>8.3f} {r['output_tok_s']:>10.1f} "
              f"{'' if share is None else f'{share:.0%}':>10} {'' if period is None else f'{period:.0%}':>10} "
              f"{'' if launch is None else f'{launch:.3f}':>11} {'' if of_loop is None else f'{of_loop:.0%}':>8}")
    phases = list(PHASES) + ["host", "total"]
    for title, part in (("wall time, perf_counter", lambda h: h), ("the thread's CPU time", lambda h: h["cpu"])):
        print(f"\nhost ms/step by phase ({title}; wait = blocked on the device, host = all but wait)")
        print(f"{'variant':>14} {'batch/rank':>10} {'mode':>6} " + " ".join(f"{p:>9}" for p in phases))
        for r in results:
            print(f"{r['variant']:>14} {r['batch_per_rank']:>10} {r['mode']:>6} "
                  + " ".join(f"{part(r['host_ms'])[p]:>9.3f}" for p in phases))
            thread = r["host_ms"].get("dispatch_thread")
            if thread:  # the dispatch thread's own time per step (its launch = the runner's launch)
                print(f"{'':>14} {'':>10} {'(thr)':>6} " + " ".join(f"{part(thread)[p]:>9.3f}" for p in phases))
    print("(thr): the dispatch thread, per step: its launch (the program called, the input block copied by the call;"
          " the engine thread packed it)")
    if any("replay_steps" in r for r in results):
        print("\nreplay of the last step without the engine loop (ms/step; launch = one call's return)")
        print(f"{'variant':>14} {'batch/rank':>10} {'mode':>6} {'loop':>9} {'run':>9} {'call':>9} {'launch':>9} "
              f"{'placed':>9} {'p.launch':>9} {'idle l.':>9} {'args l.':>9} {'read':>9} {'sync':>9} {'busy':>9}")
        for r in results:
            if "replay_steps" in r:
                busy = r.get("busy_ms_per_step")
                print(f"{r['variant']:>14} {r['batch_per_rank']:>10} {r['mode']:>6} {r['ms_per_step']:>9.3f} {r['replay_run_ms']:>9.3f} "
                      f"{r['replay_call_ms']:>9.3f} {r['replay_call_launch_ms']:>9.3f} {r['replay_call_placed_ms']:>9.3f} "
                      f"{r['replay_call_placed_launch_ms']:>9.3f} {r['replay_idle_launch_ms']:>9.3f} "
                      f"{r['replay_args_launch_ms']:>9.3f} {r['replay_read_ms']:>9.3f} {r['replay_sync_ms']:>9.3f} "
                      f"{'' if busy is None else f'{busy:9.3f}':>9}")
        print("(call: the numpy block into the call, as the engine does; placed: a device_put first, then the call;"
              " idle l.: one call's return with the device idle; args l.: a one-kernel program's, same arguments;"
              " read / sync: runner.run each step, then the tokens of the step before / its own read)")
    for variant in dict.fromkeys(r["variant"] for r in results):
        for batch in batches:
            by = {r["mode"]: r for r in results if r["batch_per_rank"] == batch and r["variant"] == variant}
            for mode in ("on", "thread"):
                if "off" in by and mode in by:
                    print(f"{variant}, batch {batch}/rank: {mode} / off tok/s = "
                          f"{by[mode]['output_tok_s'] / by['off']['output_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            env = {k: os.environ[k] for k in ENV_RECORDED if k in os.environ}  # what changes the runtime
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "env": env,
                       "platform_version": str(getattr(jax.devices()[0].client, "platform_version", "")),
                       "layers": cfg.num_layers,
                       "prompt_len": args.prompt_len, "expert_layout": layout, "results": results}, f, indent=1)
    return 0
