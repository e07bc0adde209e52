"""The Mosaic GPU grouped GEMM's tile variants beside the Triton kernel at the engine's tiles, on
the MoE calls of an 8K-token prefill chunk (`bench/gemm_tiles.CASES`: dp=1 ~192 rows an expert,
dp=2 ~384), same run, each checked against the Triton output first; prints a table, writes JSON.

    python scripts/gpu/mosaic_ab.py --json $OUT/mosaic_ab.json [--cases up_dp1,down_dp1]

The Mosaic kernel takes rows in place: for the up cases its rows are gathered by XLA, timed both
with that gather ("+gather", what the MoE would run) and on rows gathered beforehand."""
import argparse
import dataclasses
import json

import jax
import numpy as np

from atom_jax.bench import gemm_tiles as gt
from atom_jax.kernels import mosaic_grouped_gemm as mg
from atom_jax.kernels import pallas_grouped_gemm as pg

VARIANTS = {
    "default": mg.MosaicTiles(),
    "no skip_tail": mg.MosaicTiles(skip_tail=False),
    "band4": mg.MosaicTiles(band=4),
}

ap = argparse.ArgumentParser()
ap.add_argument("--cases", default="up_dp1,down_dp1,up_dp2,down_dp2")
ap.add_argument("--variants", default=",".join(VARIANTS))
ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--json", required=True)
args = ap.parse_args()
rng = np.random.default_rng(0)
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
for case in [c for c in gt.CASES if c.name in args.cases.split(",")]:
    k, n = case.kn
    inputs = gt.case_inputs(case, rng, case.groups, k, n)
    gathered = [(a if ids is None else a[ids], None, s) for a, ids, s in inputs]
    ws = (jax.random.normal(jax.random.key(7), (case.groups, k, n), jax.numpy.bfloat16) * 0.02,)
    useful = case.tokens * gt.TOPK
    flops = 2 * useful * k * n
    dense = gt.dense_time(useful, k, n, args.iters)
    tiles = pg.default_tiles(case.rows_per_group)
    calls = [("triton " + gt.tiles_name(tiles), jax.jit(gt.tiles_call(tiles)), inputs)]
    for name in args.variants.split(","):
        cfg = VARIANTS[name]
        mos = jax.jit(lambda a, w, s, ids, cfg=cfg: mg.grouped_gemm(a if ids is None else a[ids], w[0], s, cfg))
        calls.append(("mosaic " + name, mos, gathered))
        if case.projection == "up":
            calls.append(("mosaic " + name + " +gather", mos, inputs))
    ref = None
    for name, f, ins in calls:
        row = {"case": case.name, "kernel": name, "rows_per_group": case.rows_per_group}
        if name.startswith("mosaic"):
            row["tiles"] = dataclasses.asdict(VARIANTS[name.split(" ", 1)[1].removesuffix(" +gather")])
        try:
            sec, got, err = gt.time_call(f, ins, ws, args.iters, ref)
            ref = got if ref is None else ref
            row.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12, frac_of_dense=dense / sec, max_err_vs_triton=err)
            if err is not None and not err < 2e-2:
                row["error"] = f"wrong: max error {err:.3g} of the largest entry vs triton"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        out["rows"].append(row)
        print(f"{case.name:9} {name:34} {row.get('ms', 0):8.3f} ms {100 * row.get('frac_of_dense', 0):6.1f}% "
              f"of dense ({dense * 1e3:.3f} ms) err {row.get('max_err_vs_triton')} {row.get('error', '')}", flush=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
