"""`python -m atom_jax.bench gemm`: the grouped-GEMM backends at DeepSeek-V4 expert shapes per rank (experts sharded
over two GPUs), beside a dense bf16 matmul of the same M x K x N and the measured copy bandwidth.

    python -m atom_jax.bench gemm --json out.json            # GPU
    python -m atom_jax.bench gemm --tiny                      # CPU smoke run

Rows per rank = tokens per rank x top-6, routed uniformly at random over the rank's experts.
Reports TFLOP/s (useful FLOPs, 2*M*K*N) and GB/s of expert weights streamed (non-empty groups
x K x N x 2 bytes) for every backend side by side; checks each backend against a float32
reference on a skewed routing (empty and very large groups) first. Also sweeps Pallas tiles.
`--prefill-tiles` instead sweeps the bf16 kernel's tiles at a prefill chunk's MoE calls only
(bench/gemm_tiles.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.routings import skewed_sizes, uniform_sizes
from atom_jax.bench.timing import back_to_back_time, device_ceilings
from atom_jax.kernels import grouped_gemm
from atom_jax.kernels import pallas_grouped_gemm as pg

# (name, local experts, K, N): V4 gate/up projection (hidden -> I) and down projection (I ->
# hidden), 256 / 384 experts split over 2 ranks.
SHAPES = {
    "flash_up": (128, 4096, 2048),
    "flash_down": (128, 2048, 4096),
    "pro_up": (192, 7168, 3072),
    "pro_down": (192, 3072, 7168),
}
TOPK = 6
T = pg.TileConfig
# Prefill (>= 4K tokens/rank) around the 128x256x64 winner of the first sweep; the launch-order
# and half-height-tail variants measured on 2026-11-26 are in docs/benchmarks.md.
PREFILL_SWEEP = [
    T(128, 256, 64, 8, 4), T(128, 256, 64, 8, 3), T(256, 128, 64, 8, 3), T(128, 256, 32, 8, 6),
    T(128, 128, 128, 8, 3), T(64, 256, 64, 4, 4), T(128, 256, 128, 8, 2),
]
SWEEP = [
    T(16, 128, 128, 4, 4), T(16, 256, 128, 4, 3), T(32, 256, 64, 4, 4), T(64, 256, 64, 8, 3),
    T(128, 256, 64, 8, 3), T(128, 256, 64, 8, 4), T(128, 128, 64, 8, 3),
]


def check(backends, groups, k, n, rows, rng):
    """Relative error of each backend vs a float32 host reference on a skewed routing."""
    sizes = skewed_sizes(rng, rows, groups)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((groups, k, n)) / np.sqrt(k)).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    xf, wf = np.asarray(xb, np.float32), np.asarray(wb, np.float32)
    ref = np.zeros((rows, n), np.float32)
    ends = np.cumsum(sizes)
    for g in range(groups):
        ref[ends[g] - sizes[g]:ends[g]] = xf[ends[g] - sizes[g]:ends[g]] @ wf[g]
    errs = {}
    for name, fn in backends.items():
        try:
            out = np.asarray(jax.jit(lambda a, b, s: fn(a, b, s, mean_group=rows / groups))(
                xb, wb, jnp.asarray(sizes)), np.float32)
            errs[name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.all(
                np.isfinite(out)) else float("nan")
        except Exception as e:  # record, keep going
            errs[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return {"max_group": int(sizes.max()), "empty_groups": int((sizes == 0).sum()), "rel_err": errs}


def time_case(fn, groups, k, n, tokens, rng, iters):
    rows = tokens * TOPK
    sizes = [jnp.asarray(uniform_sizes(rng, rows, groups)) for _ in range(2)]
    xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
    w = jax.random.normal(jax.random.key(7), (groups, k, n), jnp.bfloat16) * 0.02
    f = jax.jit(lambda a, b, s: fn(a, b, s, mean_group=rows / groups))  # weights as an argument,
    sec = back_to_back_time(lambda i: f(xs[i], w, sizes[i]), [0, 1], iters=iters)  # not a constant
    streamed = int(sum((np.asarray(s) > 0).sum() for s in sizes) / 2) * k * n * 2
    return sec, 2.0 * rows * k * n, streamed


def dense_case(k, n, tokens, iters):
    rows = tokens * TOPK
    xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
    w = jax.random.normal(jax.random.key(7), (k, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return back_to_back_time(lambda i: f(xs[i], w), [0, 1], iters=iters)


def tiles_backend(cfg):
    return lambda rows, weights, sizes, mean_group=None: pg.grouped_gemm(
        rows, weights, sizes, cfg=cfg, interpret=jax.default_backend() == "cpu")


def save(out, path):
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("gemm", help="grouped-GEMM backends at V4 expert shapes (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="64,128,256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default="pallas,mosaic,capacity_dropless,tokamax,capacity,ragged_dot")
    ap.add_argument("--sweep-tokens", default="64,1024,4096,16384")
    ap.add_argument("--sweep", default="default", choices=["default", "prefill"])
    ap.add_argument("--sweep-shapes", type=int, default=1, help="sweep tiles on the first N shapes")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="small shapes, CPU smoke run")
    ap.add_argument("--json")
    ap.add_argument("--prefill-tiles", action="store_true",
                    help="only sweep the bf16 kernel's tiles at a prefill chunk's MoE calls (bench/gemm_tiles.py)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="--prefill-tiles: time no candidate past this many seconds")
    ap.add_argument("--tile-cases", default="",
                    help="--prefill-tiles: only these cases (comma list of up_dp1, down_dp1, up_dp2, down_dp2)")
    ap.add_argument("--compile-threads", type=int, default=8,
                    help="--prefill-tiles: kernels compiled at once (1: one after another)")
    ap.set_defaults(func=run_cli)
    return ap


def run_cli(args) -> int:
    if args.prefill_tiles:
        from atom_jax.bench import gemm_tiles
        return gemm_tiles.run(args)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    sweep_tokens = [int(t) for t in args.sweep_tokens.split(",")] if args.sweep_tokens else []
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    names = args.backends.split(",")
    sweep = SWEEP if args.sweep == "default" else PREFILL_SWEEP
    if args.tiny:
        shapes = {"tiny_up": (4, 64, 128)}
        tokens, sweep_tokens = [8, 32], [8]
        sweep = [pg.TileConfig(16, 64, 32, 4, 2)]
        names = [b for b in names if b not in ("tokamax", "mosaic")]  # GPU only
    on_gpu = jax.default_backend() != "cpu"
    ceil = device_ceilings() if on_gpu else {"copy_GBps": None, "matmul_TFLOPs": None}
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil,
           "topk": TOPK, "checks": {}, "sweep": [], "results": []}
    print(f"# {out['device']}  copy {ceil['copy_GBps']} GB/s  matmul {ceil['matmul_TFLOPs']} TFLOP/s", flush=True)
    backends = {b: grouped_gemm.get(b) for b in names}

    for shape, (g, k, n) in shapes.items():
        out["checks"][shape] = check({b: f for b, f in backends.items() if b != "ragged_dot"},
                                     g, k, n, 8 * g if not args.tiny else 40, rng)
        print(f"check {shape}: {out['checks'][shape]}", flush=True)
    save(out, args.json)

    print(f"{'shape':10} {'tok':>6} {'backend':18} {'ms':>8} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>7} {'%copy':>5}")
    for shape, (g, k, n) in shapes.items():
        for t in tokens:
            dense_s = dense_case(k, n, t, args.iters) if on_gpu else None
            base = {"shape": shape, "groups": g, "K": k, "N": n, "tokens": t, "rows": t * TOPK}
            dense_tf = 2.0 * t * TOPK * k * n / dense_s / 1e12 if dense_s else None
            out["results"].append({**base, "backend": "dense_matmul", "ms": dense_s and dense_s * 1e3,
                                   "TFLOPs": dense_tf})
            for b, fn in backends.items():
                if b == "ragged_dot" and on_gpu and t > 256:
                    continue  # dense masked product on GPU: memory blows up (docs/design.md)
                row = dict(base, backend=b)
                try:
                    sec, flops, streamed = time_case(fn, g, k, n, t, rng, args.iters)
                    row.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12, GBps=streamed / sec / 1e9)
                    if dense_tf:
                        row["frac_of_dense"] = row["TFLOPs"] / dense_tf
                    if ceil["copy_GBps"]:
                        row["frac_of_copy"] = row["GBps"] / ceil["copy_GBps"]
                    print(f"{shape:10} {t:6d} {b:18} {row['ms']:8.3f} {row['TFLOPs']:8.1f} "
                          f"{100 * row.get('frac_of_dense', 0):5.0f} {row['GBps']:7.0f} "
                          f"{100 * row.get('frac_of_copy', 0):5.0f}", flush=True)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{shape:10} {t:6d} {b:18} error {row['error'][:120]}", flush=True)
                    if os.environ.get("BENCH_TRACEBACK"):
                        traceback.print_exc()
                out["results"].append(row)
            if dense_tf:
                print(f"{shape:10} {t:6d} {'dense_matmul':18} {dense_s * 1e3:8.3f} {dense_tf:8.1f}", flush=True)
        save(out, args.json)  # partial results survive a timeout
    # Tile sweep on the first shapes: which Pallas tiles win where.
    for first, (g, k, n), t, cfg in ((s, shapes[s], t, c) for s in list(shapes)[:args.sweep_shapes]
                                     for t in sweep_tokens for c in sweep):
        try:
            sec, flops, streamed = time_case(tiles_backend(cfg), g, k, n, t, rng, args.iters)
            row = {"shape": first, "tokens": t, "tiles": dataclasses.asdict(cfg), "ms": sec * 1e3,
                   "TFLOPs": flops / sec / 1e12, "GBps": streamed / sec / 1e9}
        except Exception as e:
            row = {"shape": first, "tokens": t, "tiles": dataclasses.asdict(cfg), "error": str(e)[:300]}
        out["sweep"].append(row)
        print("sweep", json.dumps(row), flush=True)

    save(out, args.json)
    return 0
