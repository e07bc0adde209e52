"""`python -m atom_jax.bench engine-delayer`: the real engine on a random workload, PrefillDelayer off vs on vs coalesce, in one run
(one compiled engine; the scheduler is reset between modes).

    python -m atom_jax.bench engine-delayer --dp 2 --num-prompts 64 --input-len 1024 --output-len 128

Arrivals: Poisson at --request-rate requests/s (wall clock, bench_serving's request-rate
mode; `inf` queues everything at t=0), at most --max-concurrency in flight, the same arrival
times and prompts for every mode. Every bucket is compiled first (Engine.warmup), so no compile
lands in a timed run. Reports wall time, output tokens/s, mean TTFT, steps, padding waste."""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from atom_jax.config import ModelConfig, tiny
from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.loader import random_model


def mid_config() -> ModelConfig:
    """V4-shaped, small enough to build on one device quickly: every attention and routing kind."""
    return tiny(vocab_size=32000).replace(
        hidden_size=1024, num_heads=16, head_dim=128, rope_head_dim=64, q_lora_rank=256, o_groups=4,
        o_lora_rank=256, sliding_window=128, csa_ratio=4, hca_ratio=128, index_n_heads=16,
        index_head_dim=64, index_topk=128, n_routed_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=512, num_layers=4)


def run_mode(engine, mode, prompts, arrivals, out_len, concurrency):
    engine.reset_scheduler(mode)
    params = SamplingParams(max_tokens=out_len, ignore_eos=True)
    pending = list(zip(arrivals, prompts))
    active, done, out_tokens, ttft, started = 0, 0, 0, [], {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and active < concurrency and pending[0][0] <= now:
            arrival, prompt = pending.pop(0)
            rid = engine.add_request(prompt_token_ids=prompt, params=params)
            started[rid] = t0 + arrival
            active += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(pending[0][0] - now, 0.01)))
            continue
        for o in engine.step():
            if o.new_token_ids and o.request_id in started:
                ttft.append(time.perf_counter() - started.pop(o.request_id))
            out_tokens += len(o.new_token_ids)
            if o.finished:
                active -= 1
                done += 1
    wall = time.perf_counter() - t0
    st = engine.stats()
    return {"delayer": mode, "wall_s": round(wall, 2), "output_tok_s": round(out_tokens / wall, 1),
            "mean_ttft_ms": round(1e3 * float(np.mean(ttft)), 1) if ttft else None,
            "requests": done, "steps": st["steps"], "ticks": st["ticks"], "padding_waste": round(st["padding_waste"], 4),
            "mean_step_padding_waste": round(st["mean_step_padding_waste"], 4), "delayer_counts": st["delayer"],
            "tbo_on_steps": st["tbo_on_steps"]}


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("engine-delayer", help="the real engine, PrefillDelayer off/on/coalesce",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    ap.add_argument("--moe-backend", default=None, help="default: ragged_dot on CPU, pallas on GPU")
    ap.add_argument("--modes", default="off,on,coalesce")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def run_cli(args) -> int:
    cfg = tiny() if args.tiny else mid_config()
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = random_model(cfg, seed=0, dtype=dtype)
    ec = EngineConfig(dp=args.dp, dtype=str(jnp.dtype(dtype)), num_slots=32, num_pages=32 * 12, page_tokens=128,
                      max_pages_per_seq=12, max_tokens_per_step=1024, chunk_size=1024,
                      buckets=(32, 64, 128, 256, 512, 1024), tbo_min_tokens=1024, moe_backend=args.moe_backend or ("ragged_dot" if args.tiny else "pallas"))
    engine = Engine(ec, model=model, tokenizer=None)
    rng = np.random.default_rng(0)
    lens = rng.integers(int(args.input_len * args.range_ratio), args.input_len + 1, args.num_prompts)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, n))) for n in lens]
    gaps = rng.exponential(1.0 / args.request_rate, args.num_prompts) if np.isfinite(args.request_rate) \
        else np.zeros(args.num_prompts)
    arrivals = list(np.cumsum(gaps) - gaps[0])
    t0 = time.perf_counter()
    engine.warmup()  # every bucket compiled outside the timed runs
    warm_s = time.perf_counter() - t0
    rows = [run_mode(engine, m, prompts, arrivals, args.output_len, args.max_concurrency)
            for m in args.modes.split(",")]
    print(f"warm-up {warm_s:.1f} s; rate {args.request_rate}/s, {args.num_prompts} prompts")
    print(f"{'delayer':9} {'wall s':>7} {'out tok/s':>10} {'TTFT ms':>8} {'steps':>6} {'ticks':>6} {'waste':>7} {'step-mean':>9}")
    for r in rows:
        print(f"{r['delayer']:9} {r['wall_s']:7.2f} {r['output_tok_s']:10.1f} {r['mean_ttft_ms']:8.1f} {r['steps']:6d} "
              f"{r['ticks']:6d} {r['padding_waste']:7.3f} {r['mean_step_padding_waste']:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dp": args.dp, "config": "mid" if not args.tiny else "tiny", "request_rate": args.request_rate,
                       "num_prompts": args.num_prompts, "warmup_s": round(warm_s, 1), "results": rows}, f, indent=1)
    return 0
