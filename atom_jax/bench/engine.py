"""`python -m atom_jax.bench engine`: the real Engine in process (no HTTP) on SGLang
bench_serving's `random` workload, reported the way SGLang publishes it.

    python -m atom_jax.bench engine --preset v4-flash --layers 43 --dp 2 --weights native \\
        --random-input-len 8192 --random-output-len 1024 --random-range-ratio 1 \\
        --max-concurrency 1,64,256 --num-prompts 4,128,512 --trace /tmp/engine_trace --json engine.json

Model: a preset's shapes (`--preset`, `--layers` cuts the depth) with random weights in the
--weights format (native: FP4 experts, FP8 projections; fp4-experts: FP4 experts, projections in
--dtype; V4 presets: created on the devices already sharded, so a full-depth model never exists
on one device; tiny / mid: on the host), or a
checkpoint (`--model DIR`). Engine flags are the engine's own (`python -m atom_jax.serve`'s:
--num-slots, --buckets, --tbo, --delayer, --moe-backend, --compilation-cache-dir, ...); the
cache is sized to the workload (--max-model-len = the longest request, pages for every slot)
unless --max-model-len / --max-pages-per-seq / --num-pages are given.

Workload (atom_jax.bench.workload; the largest --num-prompts gives the prompts `bench serve`
sends for the same seed and count):
lengths uniform in [len * range_ratio, len], random token ids, greedy, `ignore_eos`, so each
request produces exactly its output length. Arrivals are Poisson at --request-rate in wall
time (inf: all at t=0); at most --max-concurrency requests are in flight; TTFT counts from
when a request is added to the engine (bench_serving's semaphore).

Every bucket is compiled first, outside the timed runs: traced one after the other, compiled
by --compile-workers threads at once (ModelRunner.precompile: a 43-layer step takes minutes to
compile, one program per bucket), then Engine.warmup runs each bucket once (for each
--tbo-modes entry); the persistent compilation cache (on by default, like the CLIs) makes a
rerun skip most compiling; each bucket's trace and compile seconds are printed, and each step
program's temporary memory per GPU (XLA's memory analysis) beside the GPUs' free memory; a
--tbo-modes entry whose programs need more than is free is reported (ProgramMemoryError: the
bucket, the bytes, the flags to lower) and its runs left out, the other modes run; then the
memory plan (sharding/memory.py) reserving the largest compiled step's temporaries: how many KV
tokens per GPU fit beside them. Every
--max-concurrency entry (a comma list) is its own set of timed runs on the same compiled
engine: --num-prompts gives one count for all or one per concurrency, and a run of N sends
the first N requests of one workload (the same prompts at every concurrency). --delayer-modes /
--tbo-modes run each combination at each concurrency (--modes-at last: only at the last one;
the scheduler is reset between runs).

--trace DIR: the last run (last concurrency, last combination) is profiled for --trace-steps
engine steps from its first saturated step (in flight = min(concurrency, prompts), none of them
waiting for a slot; --trace-skip-steps later; --trace-decode: once none prefills), with the engine's own profiler; the trace report
(atom_jax.trace.report: per device step and busy time, categories, top kernels) goes into the
JSON's "trace" and a few printed lines. That run's throughput includes the profiler's cost.

Reported per run (atom_jax.bench.metrics, as bench_serving defines them): total (input +
output) and output tokens/s, also per GPU (one GPU per DP rank); TTFT, TPOT, ITL, E2E mean /
median / p99; padding waste, PrefillDelayer outcomes and TBO steps from the scheduler. A table
(a column per run, its concurrency and prompt count included), and JSON with --json (rewritten
after each run, "finished" false until the end: a call cut short keeps its runs). The exit
status is 1 if any run did not complete all its prompts or a TBO mode was left out. --http repeats the first run through
the OpenAI server on the same engine (`bench serve`'s client, same prompts): the server's cost beside the engine's.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time

from atom_jax.bench.metrics import new_record, summarize_records
from atom_jax.bench.workload import random_prompt_ids, random_requests
from atom_jax.engine.args import EngineConfig, add_engine_args, engine_config, tbo_choice

TBO_NAMES = {True: "on", False: "off", None: "auto"}
SMALL_PRESETS = ("tiny", "mid")


# ---- model ----------------------------------------------------------------------------------
def mid_config():
    """V4-shaped, small enough to build on one device quickly: every attention and routing kind."""
    from atom_jax.config import tiny

    return tiny(vocab_size=32000).replace(
        hidden_size=1024, num_heads=16, head_dim=128, rope_head_dim=64, q_lora_rank=256, o_groups=4,
        o_lora_rank=256, sliding_window=128, csa_ratio=4, hca_ratio=128, index_n_heads=16,
        index_head_dim=64, index_topk=128, n_routed_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=512, num_layers=4)


def preset_config(preset: str, layers: int | None):
    from atom_jax.config import PRESETS

    if preset == "mid":
        cfg = mid_config()
        if layers is not None and layers != cfg.num_layers:
            raise SystemExit("--layers: the mid preset has 4 layers")
        return cfg
    make = PRESETS[preset]
    if layers is None:
        return make()
    if preset == "tiny":
        raise SystemExit("--layers: the tiny preset has 4 layers")
    return make(num_layers=layers)


def random_model_on_mesh(cfg, dp: int, dtype, expert_mode: str, seed: int, weights: str = "bf16",
                         expert_layout: str = "nmajor"):
    """An NNX model whose random parameters are created on the devices, sharded as the engine
    places them (so placing them again moves nothing); `weights` "native": packed FP4 / FP8,
    "fp4-experts": packed FP4 experts, dense projections; `expert_layout`: their codes' layout."""
    from flax import nnx

    from atom_jax.sharding import StepOptions, make_dp_mesh, random_params_on_mesh

    skeleton, params = random_params_on_mesh(cfg, make_dp_mesh(dp), StepOptions(expert_mode=expert_mode),
                                             dtype, seed, weights=weights, expert_layout=expert_layout)
    graphdef, state = nnx.split(skeleton)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def build_engine(args):
    """-> (Engine, ModelConfig) from parsed flags."""
    import jax
    import jax.numpy as jnp

    from atom_jax.engine import Engine
    from atom_jax.weights.formats import random_format

    if args.model is None:
        cfg = preset_config(args.preset, args.layers)
        dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
    else:
        cfg, dtype = None, args.dtype or "bfloat16"
    page_tokens = args.page_tokens or EngineConfig.page_tokens
    overrides = {"dtype": dtype, "model": args.model}
    longest = args.random_input_len + args.random_output_len
    if args.max_model_len is None and args.max_pages_per_seq is None:  # sized to the longest request
        overrides["max_model_len"] = longest
    if args.num_pages is None:  # every slot can hold a longest request
        slots = args.num_slots or EngineConfig.num_slots
        per_seq = args.max_pages_per_seq or -(-(args.max_model_len or longest) // page_tokens)
        overrides["num_pages"] = slots * per_seq
    ec = engine_config(args, **overrides)
    weights = random_format(ec.weights)
    layout = ec.expert_layout_on(jax.default_backend(), weights)  # built in it (the engine keeps a model's layout)
    if cfg is None:
        engine = Engine(ec, tokenizer=None)
        return engine, engine.model.cfg
    if args.preset in SMALL_PRESETS:  # built on the host like `--model random`
        from atom_jax.loader import random_model

        model = random_model(cfg, seed=ec.seed, dtype=jnp.dtype(dtype), weights=weights, expert_layout=layout)
    else:
        model = random_model_on_mesh(cfg, ec.dp, jnp.dtype(dtype), ec.expert_mode, ec.seed, weights, layout)
    return Engine(ec, model=model, tokenizer=None), cfg


def configure(engine, delayer: str, tbo: bool | None) -> None:
    """Select the delayer and TBO mode for the next run: a fresh scheduler over the same
    compiled runner."""
    engine.config.tbo = tbo
    engine.reset_scheduler(delayer)


# ---- one timed run --------------------------------------------------------------------------
def run_workload(engine, requests, prompts, max_concurrency: int | None, trace=None) -> dict:
    """Feed `requests` (arrival times in seconds from the start) into the engine, step it
    until every request finished; -> bench_serving summary + the scheduler's counters.
    `trace` (engine_trace.SaturatedTrace): told before each step, it profiles saturated steps."""
    from atom_jax.engine import SamplingParams

    pending = collections.deque(zip(requests, prompts))
    records, sent, last = {}, {}, {}
    in_flight = max_in_flight = 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][0].arrival_time <= now and (
                max_concurrency is None or in_flight < max_concurrency):
            req, ids = pending.popleft()
            params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
            rid = engine.add_request(prompt_token_ids=ids, params=params)
            records[rid] = new_record(len(ids))
            sent[rid] = last[rid] = time.perf_counter()
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
        if not engine.has_unfinished():
            if pending:  # idle until the next arrival
                time.sleep(max(0.0, min(pending[0][0].arrival_time - (time.perf_counter() - t0), 0.01)))
            continue
        if trace is not None:
            trace.before_step(engine, in_flight)
        outputs = engine.step()
        t = time.perf_counter()
        for o in outputs:
            rec = records[o.request_id]
            if o.new_token_ids:
                if rec["ttft"] is None:
                    rec["ttft"] = t - sent[o.request_id]
                else:
                    rec["itl"].append(t - last[o.request_id])
                last[o.request_id] = t
                rec["output_len"] += len(o.new_token_ids)
            if o.finished:
                rec["latency"] = t - sent[o.request_id]
                rec["ok"] = o.finish_reason in ("stop", "length") and rec["ttft"] is not None
                if not rec["ok"]:
                    rec["error"] = f"finish_reason {o.finish_reason}"
                in_flight -= 1
    duration = time.perf_counter() - t0
    return with_engine_counters(engine, summarize_records(list(records.values()), duration), max_in_flight)


def with_engine_counters(engine, summary: dict, max_in_flight: int | None) -> dict:
    """A bench_serving summary plus the per-GPU throughputs and the scheduler's counters."""
    st = engine.stats()
    gpus = engine.config.dp
    summary.update({
        "gpus": gpus,
        "total_token_throughput_per_gpu": summary["total_token_throughput"] / gpus,
        "output_throughput_per_gpu": summary["output_throughput"] / gpus,
        "max_in_flight": max_in_flight,
        "steps": st["steps"], "idle_ticks": st["idle_ticks"],
        "padding_waste": st["padding_waste"], "mean_step_padding_waste": st["mean_step_padding_waste"],
        "delayer_outcomes": st["delayer"], "tbo_on_steps": st["tbo_on_steps"],
        "tbo_off_steps": st["tbo_off_steps"], "bucket_steps": st["bucket_steps"],
        "num_preemptions": st["num_preemptions"],
    })
    return summary


def run_http(engine, args, requests, max_concurrency: int | None) -> dict:
    """`requests` (the first run's) through the OpenAI-compatible server (in this process, on
    this warmed engine, on a free local port) with `bench serve`'s client: what HTTP, JSON and
    SSE add."""
    import argparse as _argparse
    import asyncio
    import socket
    import threading

    import uvicorn

    from atom_jax.bench import serve_client
    from atom_jax.serve.app import ServerSettings, create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(ServerSettings(model_name="bench"), lambda: engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="bench-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the benchmark's HTTP server did not start")
            time.sleep(0.05)
        client_args = _argparse.Namespace(
            base_url=f"http://127.0.0.1:{port}", endpoint="completions", model=None, api_key=None,
            vocab_size=engine.model.cfg.vocab_size, num_prompts=len(requests),
            random_input_len=args.random_input_len, random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio, request_rate=args.request_rate,
            max_concurrency=max_concurrency, seed=args.workload_seed, timeout=3600.0)
        res = asyncio.run(serve_client.benchmark(client_args, requests))
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return with_engine_counters(engine, res, None)


_ROWS = (
    ("delayer / TBO", lambda r: f"{r['delayer']} / {r['tbo']}" + (" (HTTP)" if r.get("http") else "")
     + (" (traced)" if r.get("traced") else "")),
    ("max concurrency / prompts", lambda r: f"{r['max_concurrency'] or '-'} / {r['num_prompts']}"),
    ("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
    ("duration (s)", lambda r: f"{r['duration_s']:.2f}"),
    ("total tok/s per GPU", lambda r: f"{r['total_token_throughput_per_gpu']:.0f}"),
    ("output tok/s per GPU", lambda r: f"{r['output_throughput_per_gpu']:.0f}"),
    ("total tok/s (all GPUs)", lambda r: f"{r['total_token_throughput']:.0f}"),
    ("TTFT mean / p50 / p99 (ms)", lambda r: "{mean_ms:.0f} / {median_ms:.0f} / {p99_ms:.0f}".format(**r["ttft"])),
    ("TPOT mean / p50 / p99 (ms)", lambda r: "{mean_ms:.1f} / {median_ms:.1f} / {p99_ms:.1f}".format(**r["tpot"])),
    ("padding waste (token-weighted)", lambda r: f"{r['padding_waste']:.1%}"),
    ("padding waste (mean per step)", lambda r: f"{r['mean_step_padding_waste']:.1%}"),
    ("steps / idle ticks", lambda r: f"{r['steps']} / {r['idle_ticks']}"),
    ("delay/timeout/watermark/stall", lambda r: "{delay}/{timeout}/{watermark}/{stall}".format(**r["delayer_outcomes"])),
    ("TBO on / off steps", lambda r: f"{r['tbo_on_steps']} / {r['tbo_off_steps']}"),
    ("max in flight", lambda r: "-" if r["max_in_flight"] is None else f"{r['max_in_flight']}"),
)


def format_table(runs: list[dict]) -> str:
    width = max(24, *(len(f(r)) + 2 for r in runs for _, f in _ROWS))
    lines = []
    for label, cell in _ROWS:
        lines.append(f"{label:32}" + "".join(f"{cell(r):>{width}}" for r in runs))
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------
def _modes(text: str, parse) -> list:
    return [parse(m.strip()) for m in text.split(",") if m.strip()]


def _counts(text: str) -> list[int]:
    """A positive int or a comma list of them (argparse type)."""
    try:
        values = _modes(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or a comma list of integers: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return values


def run_plan(args) -> list[tuple[int | None, int]]:
    """(max concurrency, prompts) of each concurrency's runs, in the order given: --num-prompts
    is one value for all or one per --max-concurrency entry."""
    concurrencies, prompts = args.max_concurrency or [None], args.num_prompts
    if len(prompts) == 1:
        prompts = prompts * len(concurrencies)
    if len(prompts) != len(concurrencies):
        raise SystemExit(f"--num-prompts: {len(args.num_prompts)} values for {len(concurrencies)} "
                         "--max-concurrency values (give one, or one per concurrency)")
    return list(zip(concurrencies, prompts))


def add_parser(subparsers) -> argparse.ArgumentParser:
    from atom_jax.config import PRESETS

    p = subparsers.add_parser("engine", help="the real Engine in process on a random workload (SGLang-style report)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model shapes")
    m.add_argument("--preset", choices=sorted(PRESETS) + ["mid"], default="tiny",
                   help="shapes of the random model (default: tiny; ignored with --model)")
    m.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    add_engine_args(p)
    w = p.add_argument_group("workload (bench_serving `random` dataset)")
    w.add_argument("--num-prompts", type=_counts, default="64",
                   help="requests per run: one value, or a comma list with one per --max-concurrency entry; "
                        "a run of N sends the first N requests of one workload (the same prompts at every concurrency)")
    w.add_argument("--random-input-len", type=int, default=1024)
    w.add_argument("--random-output-len", type=int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once)")
    w.add_argument("--max-concurrency", type=_counts, default=None,
                   help="requests in flight at most (default: no cap); a comma list (1,64,256) runs each "
                        "concurrency in turn on the same compiled engine")
    w.add_argument("--workload-seed", type=int, default=1)
    p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads compiling the buckets' steps at once before warm-up (0: compile on "
                        "first use in warm-up, one after the other)")
    p.add_argument("--compile-only", action="store_true",
                   help="build and warm up (filling the persistent compilation cache), report compile times, "
                        "run nothing timed: a later run with the same flags then starts in seconds")
    c = p.add_argument_group("comparisons (one compiled engine, the same workload)")
    c.add_argument("--delayer-modes", default=None, help="comma list of off,on,coalesce,auto (default: --delayer)")
    c.add_argument("--tbo-modes", default=None, help="comma list of on,off,auto (default: --tbo)")
    c.add_argument("--modes-at", choices=("all", "last"), default="all",
                   help="run the --delayer-modes x --tbo-modes combinations at every concurrency (all) or "
                        "only at the last one, the others with the first of each list (last)")
    c.add_argument("--http", action="store_true",
                   help="then run the first run again (first concurrency and combination) through the OpenAI "
                        "server (in this process, `bench serve`'s client): what the server adds")
    t = p.add_argument_group("trace (where a saturated step's time goes)")
    t.add_argument("--trace", default=None, metavar="DIR",
                   help="profile --trace-steps engine steps of the LAST run (last concurrency, last combination) "
                        "from its first saturated step (in flight = min(concurrency, prompts), none waiting for a "
                        "slot) with Engine.start_profile, and report them (atom_jax.trace.report) in the JSON and "
                        "log; the traced run's own throughput includes the profiler's cost, the other runs' do not")
    t.add_argument("--trace-steps", type=int, default=8, help="engine steps to trace (default 8)")
    t.add_argument("--trace-skip-steps", type=int, default=0,
                   help="start the trace this many engine steps after the run saturates (default 0: a wave of "
                        "long prompts is then still prefilling; the JSON says how many were)")
    t.add_argument("--trace-decode", action="store_true",
                   help="and start it at the first such step with no sequence prefilling (nothing waiting): the "
                        "decode phase of a saturated wave")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.set_defaults(func=run_cli)
    return p


def _label(bucket: int, tbo: bool) -> str:
    return f"{bucket}{' tbo' if tbo else ''}"


def precompile_buckets(engine, workers: int) -> dict:
    """Trace every bucket's step in turn and compile them on `workers` threads at once (at full
    depth a bucket compiles in minutes: side by side they take about one's time).
    -> {bucket label: [trace s, compile s]}."""
    shapes = [(b, engine.scheduler.use_tbo(b)) for b in engine.buckets]
    times = engine.runner.precompile(shapes, workers)
    return {_label(b, t): [round(x, 2) for x in v] for (b, t), v in times.items()}


def program_memory(engine) -> dict:
    """{bucket label: temporary bytes per GPU of its step program (XLA's memory analysis; None:
    not reported)} for the buckets of the current TBO mode that are compiled."""
    temp = engine.runner.temp_bytes
    keys = [(b, engine.scheduler.use_tbo(b)) for b in engine.buckets]
    return {_label(*k): temp[k] for k in keys if k in temp}


def warm_up(engine, tbos, workers: int) -> tuple[dict, dict, dict, dict]:
    """Compile every bucket (for each TBO mode) and run each once, untimed; prints each
    bucket's trace / compile seconds and its program's temporary bytes. A mode whose programs
    need more temporary memory than the GPUs have free (ProgramMemoryError) is reported and left
    out, the others go on. -> (warm-up seconds by TBO mode, {TBO mode: {bucket: [trace s,
    compile s]}}, {TBO mode: {bucket: temporary bytes}}, {TBO mode left out: why})."""
    from atom_jax.sharding.memory import ProgramMemoryError, fmt_bytes, free_device_bytes

    warm, built, temp, refused = {}, {}, {}, {}
    for tbo in tbos:  # every bucket compiled (or read from the persistent cache), untimed
        name = TBO_NAMES[tbo]
        t0 = time.perf_counter()
        configure(engine, engine.config.delayer, tbo)
        try:
            if workers > 0:  # every bucket's step compiled in parallel first
                built[name] = precompile_buckets(engine, workers)
                print(f"precompile (TBO {name}; traced in turn, compiled by {workers} threads at once):\n"
                      + "\n".join(f"  bucket {k}: trace {v[0]:.1f} s, compile {v[1]:.1f} s"
                                  for k, v in built[name].items()), flush=True)
            engine.warmup()
        except ProgramMemoryError as e:
            refused[name] = str(e)
            print(f"TBO {name}: left out, {e}", flush=True)
            continue
        finally:
            temp[name] = program_memory(engine)
            free = free_device_bytes(engine.mesh.devices.flat)
            print(f"step programs' temporary memory per GPU (TBO {name}): "
                  + ", ".join(f"bucket {k} {'?' if v is None else fmt_bytes(v)}" for k, v in temp[name].items())
                  + (f"; free {fmt_bytes(free[0])} of {fmt_bytes(free[1])}" if free else ""), flush=True)
        warm[name] = round(time.perf_counter() - t0, 2)
        print(f"warm-up (TBO {name}): {warm[name]:.1f} s, buckets {list(engine.buckets)}", flush=True)
    return warm, built, temp, refused


def run_one(engine, requests, prompts, concurrency, delayer: str, tbo, trace=None) -> dict:
    """One timed run of `requests` (a prefix of the workload) at `concurrency`; -> its row."""
    configure(engine, delayer, tbo)
    r = run_workload(engine, requests, prompts, concurrency, trace)
    row = {"delayer": delayer, "tbo": TBO_NAMES[tbo], "max_concurrency": concurrency,
           "num_prompts": len(requests), **r}
    print(f"concurrency {concurrency or '-'}, {len(requests)} prompts, delayer {delayer}, TBO {TBO_NAMES[tbo]}: "
          f"{r['total_token_throughput_per_gpu']:.0f} total tok/s per GPU, TTFT p50 {r['ttft']['median_ms']:.0f} ms, "
          f"TPOT p50 {r['tpot']['median_ms']:.1f} ms", flush=True)
    return row


def header(args, cfg, ec) -> dict:
    """The JSON's description of the run: device, model, engine and flags."""
    import dataclasses

    import jax

    config = {k: v for k, v in vars(args).items() if k != "func"}
    for key in ("num_prompts", "max_concurrency"):  # one value: a number, as before lists were allowed
        if isinstance(config[key], list) and len(config[key]) == 1:
            config[key] = config[key][0]
    if math.isinf(args.request_rate):
        config["request_rate"] = "inf"
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "model": {"preset": args.preset if args.model is None else None, "path": args.model,
                      "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                      "routed_experts": cfg.n_routed_experts},
            "engine": dataclasses.asdict(ec), "config": config}


def save(path: str | None, res: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


def run_combos(plan, delayers, tbos, modes_at: str = "all") -> list[tuple]:
    """(concurrency, prompts, delayer, tbo) of each timed run, in order. modes_at "all": every
    delayer x TBO combination at every concurrency; "last": only at the last concurrency (the
    saturating one, where the modes differ), the others with the first delayer and TBO mode."""
    every = [(d, t) for t in tbos for d in delayers]
    if modes_at == "last":
        return [(c, n, delayers[0], tbos[0]) for c, n in plan[:-1]] + [(*plan[-1], d, t) for d, t in every]
    return [(c, n, d, t) for c, n in plan for d, t in every]


def run(args) -> dict:
    """Build, warm up, then every run in turn; with --json the file is rewritten after each
    run ("finished": false until the last), so a run cut short by a time limit keeps the rest."""
    from atom_jax.bench.engine_trace import SaturatedTrace, format_summary

    plan = run_plan(args)
    if args.trace is not None and (args.trace_steps < 1 or args.trace_skip_steps < 0):
        raise SystemExit("--trace-steps must be >= 1 and --trace-skip-steps >= 0")
    t0 = time.perf_counter()
    engine, cfg = build_engine(args)
    build_s = round(time.perf_counter() - t0, 2)
    print(f"engine built in {build_s:.1f} s ({cfg.num_layers} layers, dp {engine.config.dp})", flush=True)
    delayers = _modes(args.delayer_modes, str) if args.delayer_modes else [engine.config.delayer]
    tbos = _modes(args.tbo_modes, tbo_choice) if args.tbo_modes else [engine.config.tbo]
    total = max(n for _, n in plan)  # one workload; run i sends its first num_prompts[i] requests
    requests = random_requests(total, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.request_rate, args.workload_seed)
    prompts = random_prompt_ids(requests, cfg.vocab_size, args.workload_seed)
    warm, built, temp, refused = warm_up(engine, tbos, args.compile_workers)
    memory = engine.memory_plan()  # its reserve: the largest compiled step's temporaries
    print("memory plan, reserving the largest compiled step's temporaries:\n" + memory.format(), flush=True)
    res = {**header(args, cfg, engine.config), "build_s": build_s, "warmup_s": warm, "precompile_s": built,
           "program_temp_bytes": temp, "tbo_modes_left_out": refused, "memory_plan": memory.to_dict(), "runs": [],
           "trace": None, "finished": False}
    save(args.json, res)
    tbos = [t for t in tbos if TBO_NAMES[t] not in refused]
    combos = run_combos(plan, delayers, tbos, args.modes_at) if tbos else []
    trace = None
    for i, (c, n, delayer, tbo) in enumerate([] if args.compile_only else combos):
        if args.trace and i == len(combos) - 1:
            trace = SaturatedTrace(args.trace, args.trace_steps, min(c or n, n), args.trace_skip_steps,
                                   args.trace_decode)
        res["runs"].append(run_one(engine, requests[:n], prompts[:n], c, delayer, tbo, trace))
        save(args.json, res)
    if trace is not None:
        res["trace"] = trace.finish(engine)
        res["runs"][-1]["traced"] = True
        print("\n".join(format_summary(res["trace"])), flush=True)
    if args.http and not args.compile_only:  # the first run again, through the server
        c, n, delayer, tbo = combos[0]
        configure(engine, delayer, tbo)
        r = run_http(engine, args, requests[:n], c)
        res["runs"].append({"delayer": delayer, "tbo": TBO_NAMES[tbo], "max_concurrency": c, "num_prompts": n,
                            "http": True, **r})
        print(f"HTTP (concurrency {c or '-'}, delayer {delayer}, TBO {TBO_NAMES[tbo]}): "
              f"{r['total_token_throughput_per_gpu']:.0f} total tok/s per GPU, TTFT p50 {r['ttft']['median_ms']:.0f} ms",
              flush=True)
    res["finished"] = True
    return res


def run_cli(args) -> int:
    res = run(args)
    if res["runs"]:
        print(format_table(res["runs"]))
    if args.json:
        save(args.json, res)
        print(f"wrote {args.json}")
    done = all(r["completed"] == r["num_prompts"] for r in res["runs"])
    return 0 if done and not res["tbo_modes_left_out"] else 1
