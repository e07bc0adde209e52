"""Mosaic GPU ceilings at our shapes (GPU only): jax's warp-specialized dense matmul and jax's
ragged_dot_mgpu beside XLA's dense matmul.

    python scripts/probe_mosaic_ceilings.py out.json
"""
import dataclasses, json, os, sys, time, traceback, inspect
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax, jax.numpy as jnp, numpy as np
import bench_grouped_gemm as b
from atom_jax.bench.routings import uniform_sizes
from atom_jax.bench.timing import back_to_back_time
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd, hopper_matmul_mgpu as hm
print(inspect.signature(rd.ragged_dot)); print([f.name for f in dataclasses.fields(hm.TuningConfig)])
path = sys.argv[1]; out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
rng = np.random.default_rng(0)
def rec(**r):
    out["rows"].append(r); print(json.dumps(r), flush=True); json.dump(out, open(path, "w"), indent=1)
for shape in ["flash_up", "flash_down"]:
    g, k, n = b.SHAPES[shape]
    for t in [4096, 8192]:
        rows = t * 6
        dense = b.dense_case(k, n, t, 10)
        rec(shape=shape, tokens=t, cfg="xla_dense", ms=dense * 1e3)
        flops = 2.0 * rows * k * n
        # dense Mosaic warp-specialized matmul (the ceiling for a Mosaic kernel at this size)
        xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
        wd = jax.random.normal(jax.random.key(7), (k, n), jnp.bfloat16)
        if t == 4096:
            for tm, tn, wgd, cl, width in [(128, 128, hm.MatmulDimension.N, None, 8), (128, 128, hm.MatmulDimension.N, hm.MatmulDimension.M, 8), (128, 128, hm.MatmulDimension.M, None, 8), (128, 256, hm.MatmulDimension.M, None, 4)]:
                cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=width, wg_dimension=wgd, cluster_dimension=cl)
                try:
                    f = jax.jit(lambda a, w, cfg=cfg: hm.matmul(a, w, None, cfg))
                    sec = back_to_back_time(lambda i: f(xs[i], wd), [0, 1], iters=10)
                    err = float(jnp.linalg.norm((f(xs[0], wd).astype(jnp.float32) - (xs[0] @ wd).astype(jnp.float32))) / jnp.linalg.norm((xs[0] @ wd).astype(jnp.float32)))
                    rec(shape=shape, tokens=t, cfg=f"mgpu_dense {tm}x{tn} wg={wgd} cl={cl} w={width}", ms=sec * 1e3, frac=dense / sec, err=err)
                except Exception as e:
                    rec(shape=shape, tokens=t, cfg=f"mgpu_dense {tm}x{tn} wg={wgd} cl={cl}", error=f"{type(e).__name__}: {str(e)[:300]}")
        for bm, bn, bk, st, gbn in [(128, 128, 64, 4, 1), (128, 192, 64, 4, 1), (128, 128, 64, 4, 4), (64, 256, 64, 4, 1), (128, 256, 64, 3, 1)]:
            try:
                fn = lambda x, w, s, mean_group=None, c=(bm, bn, bk, st, gbn): rd.ragged_dot(x, w, group_sizes=s, block_m=c[0], block_n=c[1], block_k=c[2], max_concurrent_steps=c[3], grid_block_n=c[4])
                sec, fl, _ = b.time_case(fn, g, k, n, t, rng, 10)
                rec(shape=shape, tokens=t, cfg=f"jax_ragged_dot_mgpu {bm}x{bn}x{bk} s{st} gbn{gbn}", ms=sec * 1e3, frac=dense / sec)
            except Exception as e:
                rec(shape=shape, tokens=t, cfg=f"jax_ragged_dot_mgpu {bm}x{bn}x{bk} s{st} gbn{gbn}", error=f"{type(e).__name__}: {str(e)[:300]}")
