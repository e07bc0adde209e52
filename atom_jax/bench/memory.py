"""`python -m atom_jax.bench memory`: the memory plan of a DP deployment (weight bytes per GPU,
KV bytes per token, KV tokens that fit), from shapes alone; with `--build`, also build the model
with random weights directly on the devices (packed FP4 / FP8 with `--weights native`, packed FP4
experts and bf16 projections with `--weights fp4-experts`), measure
the bytes each GPU holds against the plan, and run one decode step (one-token rows, no KV
cache) and one prefill step of the sharded DP forward.

    python -m atom_jax.bench memory --preset v4-flash --layers 43 --dp 2 --weights native
    python -m atom_jax.bench memory --preset v4-flash --layers 43 --dp 2 --weights native --build --json m.json
    python -m atom_jax.bench memory --preset v4-flash --dp 2 --weights fp4-experts --build
    python -m atom_jax.bench memory --preset tiny --dp 2 --weights native --build      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

PRESET_DIMS = ("v4-flash", "v4-pro", "tiny")


def _config(args):
    from atom_jax.config import PRESETS
    if args.preset == "tiny":
        return PRESETS["tiny"]()
    return PRESETS[args.preset](num_layers=args.layers) if args.layers else PRESETS[args.preset]()


def _build_and_step(args, cfg, plan, out):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from atom_jax.sharding import DP, StepOptions, make_dp_mesh, make_step, random_params_on_mesh
    from atom_jax.sharding.memory import fmt_bytes, measured_bytes_per_device

    mesh = make_dp_mesh(args.dp)
    dtype = jnp.dtype(args.dtype)
    opts = StepOptions(moe_backend=args.backend, output="hidden")
    t0 = time.perf_counter()
    model, params = random_params_on_mesh(cfg, mesh, opts, dtype, weights=args.weights)
    jax.block_until_ready(params)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    measured = measured_bytes_per_device(params)
    out["measured_weight_bytes_per_gpu"] = {str(d): n for d, n in measured.items()}
    in_use = {}
    for d in mesh.devices.flat:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats:
            in_use[str(d)] = stats.get("bytes_in_use")
    out["bytes_in_use_after_build"] = in_use
    for d, n in measured.items():
        print(f"{d}: weights {fmt_bytes(n)} measured vs {fmt_bytes(plan.weight_bytes_per_gpu)} planned"
              + (f"; bytes in use {fmt_bytes(in_use[str(d)])}" if in_use.get(str(d)) else ""), flush=True)
    step, _ = make_step(model, mesh, opts, place=False)
    rng = np.random.default_rng(0)
    for phase, rows, seq in (("decode", args.decode_tokens, 1), ("prefill", max(1, args.prefill_tokens // args.seq),
                                                                 args.seq)):
        ids = jax.device_put(jnp.asarray(rng.integers(0, cfg.vocab_size, (args.dp * rows, seq)), jnp.int32),
                             NamedSharding(mesh, P(DP)))
        t0 = time.perf_counter()
        compiled = step.lower(params, ids).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, ids))  # warm-up
        t0 = time.perf_counter()
        hidden = jax.block_until_ready(compiled(params, ids))
        ms = (time.perf_counter() - t0) * 1e3
        peak = {}
        for d in mesh.devices.flat:
            stats = d.memory_stats() if hasattr(d, "memory_stats") else None
            if stats and "peak_bytes_in_use" in stats:
                peak[str(d)] = stats["peak_bytes_in_use"]
        ok = bool(jnp.all(jnp.isfinite(hidden.astype(jnp.float32))))
        row = {"phase": phase, "tokens_per_rank": rows * seq, "compile_s": round(compile_s, 1), "ms": round(ms, 3),
               "finite": ok, "peak_bytes_in_use": peak}
        out["steps"].append(row)
        print(json.dumps(row), flush=True)
        del compiled


def run(args) -> int:
    from atom_jax.sharding.memory import GiB, memory_plan

    cfg = _config(args)
    import jax.numpy as jnp
    plan = memory_plan(cfg, args.dp, args.weights, int(args.gpu_gib * GiB), jnp.dtype(args.dtype),
                       page_tokens=args.page_tokens, num_slots=args.num_slots,
                       reserve_bytes=int(args.reserve_gib * GiB), prefix_caching=args.prefix_caching,
                       state_pages=args.prefix_state_pages)
    print(f"{args.preset} ({cfg.num_layers} layers), dtype {args.dtype}", flush=True)
    print(plan.format(), flush=True)
    out = {"preset": args.preset, "layers": cfg.num_layers, "plan": plan.to_dict(), "steps": []}
    if args.build:
        import jax
        out["device"] = jax.devices()[0].device_kind
        _build_and_step(args, cfg, plan, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from atom_jax.weights import formats

    p = subparsers.add_parser("memory", help="memory plan per GPU (weights, KV); --build: measure it and run "
                              "one decode and one prefill step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESET_DIMS, default="v4-flash")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--weights", choices=formats.MODEL_FORMATS, default="native",
                   help="bf16: every weight dense; native: FP4 experts, FP8 projections; fp4-experts: "
                   "FP4 experts, dense projections")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--gpu-gib", type=float, default=139.0, help="memory of one GPU (H200: ~139 GiB usable)")
    p.add_argument("--reserve-gib", type=float, default=8.0, help="kept back for activations and workspace")
    p.add_argument("--page-tokens", type=int, default=128)
    p.add_argument("--num-slots", type=int, default=64, help="resident sequences per rank")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="plan the prefix cache's window-state pool, as the engine's default does "
                   "(default: on)")
    p.add_argument("--prefix-state-pages", type=int, default=None,
                   help="pages whose window state the prefix cache keeps (default: 4 per slot; at most "
                   "the pages that fit beside it)")
    p.add_argument("--build", action="store_true", help="build random weights on the devices and run steps")
    p.add_argument("--backend", default="auto", help="grouped-GEMM backend for --build")
    p.add_argument("--decode-tokens", type=int, default=64, help="--build: one-token rows per rank")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="--build: prefill tokens per rank")
    p.add_argument("--seq", type=int, default=1024, help="--build: prefill sequence length")
    p.add_argument("--json")
    p.set_defaults(func=run)
    return p
