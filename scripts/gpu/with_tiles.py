"""Run `python -m atom_jax.bench ...` with the bf16 grouped GEMM's MID_TILES (and so pair_tiles'
mid tier) replaced, for same-machine A/B runs of a tiles default before it is changed in code:

    python scripts/gpu/with_tiles.py 128x256x64x8x4xht -- long-context --prompts 131072 ...

Spec: `bench/gemm_tiles.tiles_spec`'s (MxNxKxWARPSxSTAGES[xht]); "default": as in the code. (Session 18 ran it with
fold_tail, a variant measured slower and reverted: 0745942, 23ae3a6.)"""
import sys

from atom_jax.bench.__main__ import main
from atom_jax.bench.gemm_tiles import tiles_from_spec
from atom_jax.kernels import pallas_grouped_gemm as pg

spec, sep, *rest = sys.argv[1:]
assert sep == "--", "usage: with_tiles.py SPEC -- bench args..."
if spec != "default":
    pg.MID_TILES = tiles_from_spec(spec)
print(f"MID_TILES = {pg.MID_TILES}", flush=True)
sys.exit(main(rest))
