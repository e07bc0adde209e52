"""`python -m atom_jax.bench engine-step`: decode and prefill throughput of the engine's cached step at V4-Flash layer dimensions,
against rooflines from ceilings measured in the same run (device copy bandwidth, bf16 matmul).

    python -m atom_jax.bench engine-step --layers 4 --dp 1,2 --decode 64,256 --prefill 2048 --json out.json

Decode: B sequences per rank, one token each, at context --context (cache pages allocated,
contents random). Prefill: one chunk of N tokens per rank at position 0. Roofline bytes per
step = every parameter on a rank read once (the capacity backend streams all local experts)
plus the cache rows the step reads; FLOPs for prefill from the projection and attention shapes."""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.bench.roofline import decode_kv_bytes, param_bytes_per_rank, prefill_flops, step_floor
from atom_jax.bench.timing import device_ceilings, median_time
from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.config import tiny, v4_flash
from atom_jax.sharding import DP, StepOptions, make_dp_mesh, random_params_on_mesh
from atom_jax.sharding.cached_step import make_cached_step
from atom_jax.trace.capture import profile_steps


def timed(fn, iters=10):
    return median_time(lambda _: fn(), iters=iters)[0]


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("engine-step", help="the cached step vs rooflines (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dp", default="1,2")
    ap.add_argument("--decode", default="64,256")
    ap.add_argument("--prefill", default="2048")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile", metavar="DIR", help="jax.profiler trace of 3 steps of the largest case "
                    "(largest dp and size; read with python -m atom_jax.trace report)")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def run_cli(args) -> int:
    cfg = tiny() if args.tiny else v4_flash(num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    ceil = device_ceilings()
    print(f"device {jax.devices()[0].device_kind}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    results = []
    for dp in map(int, args.dp.split(",")):
        results += run_dp(dp, cfg, dtype, ceil, args)
        jax.clear_caches()
    print(f"\n{'dp':>2} {'phase':8} {'tok/rank':>8} {'step ms':>9} {'tok/s':>10} {'floor ms':>9} {'floor/step':>10}")
    for r in results:
        print(f"{r['dp']:2d} {r['phase']:8} {r['tokens_per_rank']:8d} {r['step_ms']:9.2f} {r['tok_s_total']:10.0f} "
              f"{r['roofline_ms']:9.2f} {r['of_roofline']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil,
                       "layers": cfg.num_layers, "results": results}, f, indent=1)
    return 0


def run_dp(dp, cfg, dtype, ceil, args):
    results = []
    mesh = make_dp_mesh(dp)
    opts = StepOptions(moe_backend="capacity")
    model, params = random_params_on_mesh(cfg, mesh, opts, dtype)
    pbytes = param_bytes_per_rank(params)
    decode = [int(b) for b in args.decode.split(",") if b]
    prefill = [int(n) for n in args.prefill.split(",") if n]
    slots = max(decode + [1])
    page_tokens = 256 if not args.tiny else 128
    ctx = args.context
    pages_per_seq = -(-(ctx + max(prefill + [1])) // page_tokens)
    layout = CacheLayout(num_slots=slots, num_pages=slots * pages_per_seq, page_tokens=page_tokens,
                         max_pages_per_seq=pages_per_seq)
    shard = NamedSharding(mesh, P(DP))
    one = init_cache(cfg, layout, dtype)
    cache = jax.tree.map(lambda a: jax.device_put(jnp.broadcast_to(a, (dp,) + a.shape), shard), one)
    # ring rows of a full window so decode reads real-looking positions
    cache = [dict(c, ring_pos=jax.device_put(jnp.broadcast_to(
        (ctx - cfg.sliding_window + jnp.arange(cfg.sliding_window))[None, None], c["ring_pos"].shape).astype(jnp.int32),
        shard)) for c in cache]
    pt = np.arange(slots * pages_per_seq, dtype=np.int32).reshape(slots, pages_per_seq)
    page_table = jax.device_put(jnp.asarray(np.broadcast_to(pt, (dp,) + pt.shape)), shard)
    step, _ = make_cached_step(model, mesh, layout, opts)
    rng = np.random.default_rng(0)
    for phase, sizes in (("decode", decode), ("prefill", prefill)):
        for n in sizes:
            if phase == "decode":
                chunks = [(s, ctx, rng.integers(0, cfg.vocab_size, 1), True) for s in range(n)]
                size = n
            else:
                chunks = [(0, 0, rng.integers(0, cfg.vocab_size, n), True)]
                size = n
            b = pack_chunks(chunks, size, slots)
            batch = {k: jax.device_put(jnp.asarray(np.broadcast_to(v, (dp,) + v.shape)), shard)
                     for k, v in b.arrays().items()}
            state = {"cache": cache}

            def run():
                logits, state["cache"] = step(params, state["cache"], batch, page_table)
                return logits

            t0 = time.perf_counter()
            jax.block_until_ready(run())
            compile_s = time.perf_counter() - t0
            sec = timed(run)
            if args.profile and dp == max(map(int, args.dp.split(","))) and n == max(decode + prefill):
                profile_steps(os.path.join(args.profile, f"dp{dp}_{phase}_{n}"), run, steps=3, warmup=0)
            cache = state["cache"]
            tokens = n
            kv_bytes = decode_kv_bytes(cfg, ctx, dtype) * tokens if phase == "decode" else 0
            floor = step_floor(ceil, pbytes + kv_bytes, prefill_flops(cfg, n) if phase == "prefill" else 0.0)
            r = {"dp": dp, "phase": phase, "tokens_per_rank": tokens, "context": ctx if phase == "decode" else 0,
                 "step_ms": round(sec * 1e3, 3), "tok_s_total": round(dp * tokens / sec, 1),
                 "roofline_ms": round(floor * 1e3, 3), "of_roofline": round(floor / sec, 3),
                 "param_GB_per_rank": round(pbytes / 1e9, 2), "compile_s": round(compile_s, 1)}
            results.append(r)
            print(json.dumps(r), flush=True)
    return results
