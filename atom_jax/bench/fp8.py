"""`python -m atom_jax.bench fp8`: the FP8 block-scaled projections (attention, shared expert) at
DeepSeek-V4 shapes: the Pallas kernel (`kernels/fp8_dense_gemm.py`, 1 byte per weight streamed)
and the XLA path (decode per 128x128 block, then one matmul) beside a bf16 matmul of the same
shape, with the copy bandwidth and dense matmul rate measured in the same run. Decides
`packed.FP8_KERNEL_MAX_ROWS` and `FP8_KERNEL_MAX_K` (where the XLA path starts to win).

    python -m atom_jax.bench fp8 --json fp8.json      # GPU
    python -m atom_jax.bench fp8 --tiny               # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import json

# name: (K = in, N = out). The model runs wq_a | wkv and the shared gate | up each as ONE fused
# projection (packed_params.FUSED): *_wqkv and *_shared_gate_up; the separate shapes stay for
# comparison with earlier runs.
SHAPES = {
    "flash_wq_a": (4096, 1024), "flash_wq_b": (1024, 32768), "flash_wkv": (4096, 512),
    "flash_wo_b": (8192, 4096), "flash_shared_up": (4096, 2048), "flash_shared_down": (2048, 4096),
    "flash_wqkv": (4096, 1536), "flash_shared_gate_up": (4096, 4096),
    "pro_wq_a": (7168, 1536), "pro_wq_b": (1536, 65536), "pro_wo_b": (16384, 7168),
    "pro_shared_up": (7168, 3072), "pro_wqkv": (7168, 2048), "pro_shared_gate_up": (7168, 6144),
}


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from atom_jax.bench.timing import back_to_back_time, device_ceilings
    from atom_jax.kernels import packed
    from atom_jax.models.packed_params import random_codes

    on_cpu = jax.default_backend() == "cpu"
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.tiny:
        shapes, rows_list = {"tiny": (256, 256)}, [16, 64]
    ceil = {"copy_GBps": None, "matmul_TFLOPs": None} if on_cpu else device_ceilings()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil, "results": []}
    print(f"# {out['device']}  copy {ceil['copy_GBps']} GB/s  matmul {ceil['matmul_TFLOPs']} TFLOP/s", flush=True)
    print(f"{'shape':18} {'rows':>6} {'path':7} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'%copy':>5} {'x bf16':>6}")
    for shape, (k, n) in shapes.items():
        key = jax.random.key(0)
        codes = random_codes(key, (n, k))
        scale = jnp.full((n // 128, k // 128), 1e-3, jnp.float32)
        w_bf16 = jax.random.normal(key, (n, k), jnp.bfloat16)
        for m in rows_list:
            xs = [jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16) for i in range(2)]
            paths = {
                "bf16": (jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w)), (w_bf16,), 2.0),
                "kernel": (jax.jit(lambda x, c, s: packed.fp8_linear(x, c, s, use_kernel=True)), (codes, scale), 1.0),
                "xla": (jax.jit(lambda x, c, s: packed.fp8_linear(x, c, s, use_kernel=False)), (codes, scale), 1.0),
            }
            base = None
            for name, (fn, ws, bpw) in paths.items():
                sec = back_to_back_time(lambda i, fn=fn, ws=ws: fn(xs[i], *ws), [0, 1], iters=args.iters)
                base = base or sec
                row = {"shape": shape, "K": k, "N": n, "rows": m, "path": name, "ms": sec * 1e3,
                       "TFLOPs": 2.0 * m * k * n / sec / 1e12, "GBps": k * n * bpw / sec / 1e9,
                       "speedup_vs_bf16": base / sec}
                row["frac_of_copy"] = ceil["copy_GBps"] and row["GBps"] / ceil["copy_GBps"]
                out["results"].append(row)
                print(f"{shape:18} {m:6d} {name:7} {row['ms']:8.3f} {row['TFLOPs']:8.1f} {row['GBps']:7.0f} "
                      f"{100 * (row['frac_of_copy'] or 0):5.0f} {row['speedup_vs_bf16']:6.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fp8", help="FP8 block-scaled projections: Pallas kernel vs XLA decode vs bf16",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="64,256,1024,8192", help="tokens per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="small shapes, CPU smoke run")
    p.add_argument("--json")
    p.set_defaults(func=run)
    return p
