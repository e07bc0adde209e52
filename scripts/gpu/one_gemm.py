"""One MoE grouped-GEMM case of `bench gemm --prefill-tiles` (default: dp=1's down projection, ~192
rows per expert, the engine's tiles for it), called `--calls` times: a small target for a kernel
profiler (ncu) on the device machine.

    python scripts/gpu/one_gemm.py --case down_dp1 --calls 3 [--tiles 128x256x64x8x4xht]

--tiles: `bench/gemm_tiles.tiles_spec`'s (MxNxKxWARPSxSTAGES[xht]). (Session 18's s18e ran it with an
xft flag for the reverted fold_tail tree, 0745942.)"""
import argparse

import jax
import numpy as np

from atom_jax.bench import gemm_tiles
from atom_jax.kernels import pallas_grouped_gemm as pg

ap = argparse.ArgumentParser()
ap.add_argument("--case", default="down_dp1", choices=[c.name for c in gemm_tiles.CASES])
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--tiles", default="")
args = ap.parse_args()
case = next(c for c in gemm_tiles.CASES if c.name == args.case)
k, n = case.kn
a, ids, sizes = gemm_tiles.case_inputs(case, np.random.default_rng(0), case.groups, k, n, copies=1)[0]
w = jax.random.normal(jax.random.key(7), (case.groups, k, n), jax.numpy.bfloat16) * 0.02
cfg = gemm_tiles.tiles_from_spec(args.tiles) if args.tiles else pg.default_tiles(case.rows_per_group)
f = jax.jit(lambda a, w, s, i: pg.grouped_gemm(a, w, s, cfg=cfg, row_ids=i, zero_tail=False))
for _ in range(args.calls):
    out = f(a, w, sizes, ids)
out.block_until_ready()
print(f"{case.name}: {cfg}, {args.calls} calls", flush=True)
