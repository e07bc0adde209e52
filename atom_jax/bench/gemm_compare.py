"""`python -m atom_jax.bench gemm-compare`: our Mosaic GPU grouped GEMM (tile configs from `configs()`)
beside the Triton kernel (in place, and with the round-4 pad/slice/zeroing copies around it) and
the same-size dense matmul, same run; correctness vs float32 first (GPU only).

    python -m atom_jax.bench gemm-compare --json out.json --shapes flash_up,flash_down,pro_up \\
        --tokens 4096,8192,16384

Also times each kernel on a one-group problem of the first shape (every row in one expert, the
dense matmul's own shape) to separate per-work-item overhead from grouped-specific costs, and
on a problem with half the rows past the last group (dp=2 with experts sharded), all rows vs the
local half alone, for what zeroing those rows costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench import gemm as b
from atom_jax.bench.routings import uniform_sizes
from atom_jax.bench.timing import back_to_back_time, device_ceilings
from atom_jax.kernels import pallas_grouped_gemm as pg


def _mosaic():
    from atom_jax.kernels import mosaic_grouped_gemm as mg  # GPU-only kernel module
    return mg


def configs():
    """The Mosaic tile configs under test (edit to compare variants)."""
    return [_mosaic().PREFILL_MOSAIC]


def mosaic_backend(cfg):
    return lambda x, w, s, mean_group=None: _mosaic().grouped_gemm(x, w, s, cfg)


def triton_with_copies(x, w, s, mean_group=None):
    """The round-4 wrapper around today's kernel: rows padded by a tile, output sliced, rows
    past the last group zeroed by a pass over the output (what the in-place path removed)."""
    bm = pg.PREFILL_TILES.block_m
    starts, ends = pg.group_ranges(s)
    out = pg.grouped_gemm_ranges(jnp.pad(x, ((0, bm), (0, 0))), w, starts, ends, pg.PREFILL_TILES)[:x.shape[0]]
    return jnp.where((jnp.arange(x.shape[0]) < ends[-1])[:, None], out, 0).astype(x.dtype)


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("gemm-compare", help="Mosaic vs Triton grouped GEMM vs dense, same run (GPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="flash_up,flash_down,pro_up")
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--json", required=True)
    ap.set_defaults(func=run_cli)
    return ap


def run_cli(args) -> int:
    cfgs = configs()
    path, shapes = args.json, args.shapes.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    # Roofline per case: the expert weights must be streamed at least once, so a kernel can reach
    # at most dense / max(dense, weight bytes / copy bandwidth) of the dense rate.
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": device_ceilings(),
           "checks": {}, "rows": []}
    print(out["ceilings"], flush=True)
    rng = np.random.default_rng(0)
    for shape in shapes:
        g, k, n = b.SHAPES[shape]
        t0 = time.time()
        out["checks"][shape] = b.check({**{json.dumps(dataclasses.asdict(c)): mosaic_backend(c) for c in cfgs},
                                        "triton": b.tiles_backend(pg.PREFILL_TILES)}, g, k, n, 8 * g, rng)
        print("check", shape, out["checks"][shape], f"{time.time() - t0:.0f}s", flush=True)
    save()
    for shape in shapes:
        g, k, n = b.SHAPES[shape]
        for t in tokens:
            dense = b.dense_case(k, n, t, 10)
            cases = [("triton " + json.dumps(dataclasses.asdict(pg.PREFILL_TILES)), b.tiles_backend(pg.PREFILL_TILES)),
                     ("triton_with_round4_copies", triton_with_copies)]
            cases += [("mosaic " + json.dumps(dataclasses.asdict(c)), mosaic_backend(c)) for c in cfgs]
            for name, fn in cases:
                try:
                    sec, flops, streamed = b.time_case(fn, g, k, n, t, rng, 10)
                    floor = streamed / (out["ceilings"]["copy_GBps"] * 1e9)
                    row = dict(shape=shape, tokens=t, cfg=name, ms=sec * 1e3, frac=dense / sec, dense_ms=dense * 1e3,
                               weight_floor_ms=floor * 1e3, roofline_frac=dense / max(dense, floor))
                except Exception as e:
                    row = dict(shape=shape, tokens=t, cfg=name, error=f"{type(e).__name__}: {str(e)[:300]}")
                out["rows"].append(row)
                print(f"{shape} {t} {row.get('ms', 0):.3f}ms {100 * row.get('frac', 0):.1f}% dense={dense * 1e3:.3f} "
                      f"roofline={100 * row.get('roofline_frac', 0):.0f}% {name} {row.get('error', '')}", flush=True)
            save()

    # One group holding every row: the dense matmul's problem through each kernel.
    g, k, n = b.SHAPES[shapes[0]]
    t = tokens[0]
    rows = t * b.TOPK
    xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
    w1 = jax.random.normal(jax.random.key(7), (1, k, n), jnp.bfloat16)
    one = jnp.asarray([rows], jnp.int32)
    dense = b.dense_case(k, n, t, 10)
    cases = [("triton", b.tiles_backend(pg.PREFILL_TILES))] + \
        [("mosaic " + json.dumps(dataclasses.asdict(c)), mosaic_backend(c)) for c in cfgs]
    # jax's own warp-specialized dense Mosaic matmul on the same problem: the ceiling for ours
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    hm_cfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                             grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=8)
    cases.append(("jax_hopper_matmul_mgpu (dense)", lambda a, w, s: hm.matmul(a, w[0], None, hm_cfg)))
    for name, fn in cases:
        f = jax.jit(lambda a, w, s, fn=fn: fn(a, w, s))
        sec = back_to_back_time(lambda i: f(xs[i], w1, one), [0, 1], iters=10)
        row = dict(shape=shapes[0] + "_one_group", tokens=t, cfg=name, ms=sec * 1e3, frac=dense / sec,
                   dense_ms=dense * 1e3)
        out["rows"].append(row)
        print(f"one_group {t} {row['ms']:.3f}ms {100 * row['frac']:.1f}% dense={dense * 1e3:.3f} {name}", flush=True)
    save()

    # Half the rows past the last group, as under dp=2 with experts sharded (choices of the other
    # rank's experts sort there and must come out zero): each kernel on all rows vs on the local
    # half alone; the difference is what the zero range costs.
    sizes = [jnp.asarray(uniform_sizes(rng, rows // 2, g)) for _ in range(2)]
    halves = [jnp.array(x[:rows // 2]) for x in xs]  # sliced once, outside the timing
    w = jax.random.normal(jax.random.key(7), (g, k, n), jnp.bfloat16) * 0.02
    cases = [("triton", b.tiles_backend(pg.PREFILL_TILES)), ("triton_with_round4_copies", triton_with_copies)]
    cases += [("mosaic " + json.dumps(dataclasses.asdict(c)), mosaic_backend(c)) for c in cfgs]
    for name, fn in cases:
        f = jax.jit(lambda a, w, s, fn=fn: fn(a, w, s))
        full = back_to_back_time(lambda i: f(xs[i], w, sizes[i]), [0, 1], iters=10)
        local = back_to_back_time(lambda i: f(halves[i], w, sizes[i]), [0, 1], iters=10)
        row = dict(shape=shapes[0] + "_half_past_last_group", tokens=t, cfg=name, ms=full * 1e3,
                   local_half_ms=local * 1e3)
        out["rows"].append(row)
        print(f"half_past_last_group {t} all rows {full * 1e3:.3f}ms, local half alone {local * 1e3:.3f}ms {name}",
              flush=True)
    save()
    return 0
