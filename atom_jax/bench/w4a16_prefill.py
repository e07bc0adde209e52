"""`python -m atom_jax.bench w4a16 --prefill-sweep`: the tiles of the seam's K-major prefill path
(K-major FP4 codes decoded to [E, N, K] bf16 by `fp4_dequant.dequantize_k_major`, then the bf16
Pallas kernel with `transpose_b`), so that one GPU call picks its defaults:

* the bf16 kernel's tiles (`GEMM_TILES`, at most 8) on the decoded weights (decoded once per
  shape, outside the timing), at every shape and each prefill token count (>= 32 rows per
  expert), each checked against the same run's `pallas_grouped_gemm.default_tiles` output on
  the timed inputs (the default itself is checked against float32 by the main table's
  `dequant_pallas_kmajor`), beside the dense matmul of the same M x K x N;
* the decode kernel's tiles (`DECODE_TILES`) on the first shape: GB/s of packed bytes read +
  bf16 written, beside the same run's copy bandwidth;
* on the first shape, the fused W4A16 kernel on the same K-major codes at taller row tiles
  (`W4A16_TILES`: 256 rows decode each weight tile once per 256 rows instead of per 64-128, and
  no bf16 copy of the experts is written and read back), checked the same way, timed beside
  the decode-then-bf16 path (`path` rows: the decode + the best bf16 tiles, as the seam runs it);
* at every shape, the fused W4A16 kernel with the swap-AB product (`W4A16_SWAP_TILES`).
"""

from __future__ import annotations

import dataclasses
import time

# (block_m, block_n, block_k, num_warps, num_stages): the bf16 kernel's prefill tiles first, then
# around it; each within Hopper's 227 KiB of shared memory per block (A + B tiles x stages).
GEMM_TILES = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
              (64, 256, 64, 4, 4), (256, 128, 64, 8, 4), (128, 128, 64, 8, 5), (64, 128, 128, 4, 4)]
# (block_k, block_n, num_warps, num_stages[, gather_codes]) of `dequantize_k_major`: KMAJOR_TILES first.
DECODE_TILES = [(512, 64, 4, 1), (256, 128, 4, 1), (1024, 32, 4, 1), (512, 128, 8, 1), (256, 64, 4, 1),
                (512, 64, 4, 1, True), (256, 128, 4, 1, True)]
# The W4A16 kernel (K-major codes, MMA): 256-row tiles (no register spills in an offline sm_90a
# compile of their TTIR; 512 x 64 and 256 x 128 spilled), then the 128-row ones near the
# [K/2, N] codes' 8K-token best (128x128x128, 8 warps).
W4A16_TILES = [(256, 64, 64, 8, 3), (256, 64, 128, 8, 2), (256, 64, 64, 8, 4), (128, 64, 128, 8, 3),
               (128, 128, 128, 8, 3)]
# The same kernel with the swap-AB product (out^T = W^T . A^T), timed at every shape: the decoded
# weight tile is then wgmma's A operand, which Hopper takes from registers (no trip through shared
# memory, the cost that held the plain kernel at 28-44% of dense at 8K tokens), and the token
# rows are its N side: (block_m rows = N side, block_n weights = M side, block_k, warps, stages).
# H200, session 17: best 128x64x128 4 warps 3 stages, 1.3x the plain fused kernel, 1.2x slower than
# the seam's decode + bf16 path (docs/benchmarks.md), so the seam keeps that path.
W4A16_SWAP_TILES = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                    (64, 128, 128, 8, 3), (128, 64, 128, 4, 3), (128, 128, 64, 4, 4), (256, 64, 64, 4, 3)]
COMPILE_THREADS = 8  # candidates compiled at once (Triton and ptxas release the GIL)
TINY_GEMM_TILES = [(16, 32, 32, 4, 2), (16, 64, 32, 4, 2)]
TINY_DECODE_TILES = [(64, 32, 4, 1)]
TINY_W4A16_TILES = [(32, 32, 64, 4, 2)]
TINY_W4A16_SWAP_TILES = [(32, 32, 64, 4, 2)]


def _row_err(got, want, valid: int) -> float:
    """Max relative row error of `got` vs `want` over the first `valid` rows, computed on the
    device (the outputs are [49152, N] at 8K tokens: only the scalar comes back)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def err(a, b):
        a, b = a[:valid].astype(jnp.float32), b[:valid].astype(jnp.float32)
        return jnp.max(jnp.linalg.norm(a - b, axis=1) / (jnp.linalg.norm(b, axis=1) + 1e-6))

    return float(err(got, want))


def prefill_sweep(args, shapes, tokens, ceil, out, on_cpu: bool, save):
    """Times `GEMM_TILES` (every shape, prefill token counts) and `DECODE_TILES` (first shape);
    rows into out["prefill_sweep"] / out["prefill_decode_sweep"]; prints each shape's best."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from atom_jax.bench.gemm import TOPK, dense_case
    from atom_jax.bench.gemm_tiles import compile_all
    from atom_jax.bench.routings import uniform_sizes
    from atom_jax.bench.timing import back_to_back_time
    from atom_jax.bench.w4a16 import CHECK_TOL, DECODE_ROWS_PER_EXPERT, _time_decode, failure, random_fp4, tiles_name
    from atom_jax.kernels import fp4_dequant as fd
    from atom_jax.kernels import pallas_grouped_gemm as pg
    from atom_jax.kernels import w4a16_grouped_gemm as wg
    from atom_jax.kernels.packed import to_k_major

    gemm_tiles = [pg.TileConfig(*t) for t in (TINY_GEMM_TILES if args.tiny else GEMM_TILES)]
    decode_tiles = [fd.DequantTiles(*t) for t in (TINY_DECODE_TILES if args.tiny else DECODE_TILES)]
    w4a16_tiles = [pg.TileConfig(*t) for t in (TINY_W4A16_TILES if args.tiny else W4A16_TILES)]
    swap_tiles = [pg.TileConfig(*t, swap_ab=True) for t in (TINY_W4A16_SWAP_TILES if args.tiny else W4A16_SWAP_TILES)]
    out.setdefault("prefill_sweep", [])
    out.setdefault("prefill_decode_sweep", [])
    rng = np.random.default_rng(1)
    for si, (shape, (g, k, n)) in enumerate(shapes.items()):
        w_km = to_k_major(random_fp4(jax.random.key(8), g, k, n))
        decode_s = None  # the seam's decode (KMAJOR_TILES) of this shape's experts
        for dcfg in decode_tiles if si == 0 else [fd.KMAJOR_TILES]:
            row = {"shape": shape, "tiles": dataclasses.asdict(dcfg)}
            try:
                row = _time_decode(lambda w, c=dcfg: fd.dequantize_k_major(w, c, interpret=on_cpu), w_km, ceil,
                                   args.iters, **row)
                print(f"prefill decode sweep {shape} {tiles_name(dcfg)} {row['ms']:.3f} ms {row['GBps']:.0f} GB/s "
                      f"{100 * (row['frac_of_copy'] or 0):.0f}% of copy", flush=True)
                if dcfg == fd.KMAJOR_TILES or (args.tiny and decode_s is None):
                    decode_s = row["ms"] / 1e3
            except Exception as e:  # a tile shape the compiler refuses is a result too
                row["error"] = failure(e)
                print(f"prefill decode sweep {shape} {tiles_name(dcfg)} {row['error']}", flush=True)
            out["prefill_decode_sweep"].append(row)
        wt = jax.block_until_ready(fd.dequantize_k_major(w_km, interpret=on_cpu))  # [E, N, K], once
        for t in [t for t in tokens if t * TOPK / g >= DECODE_ROWS_PER_EXPERT] or tokens[-1:]:
            rows, flops = t * TOPK, 2.0 * t * TOPK * k * n
            sizes = [jnp.asarray(uniform_sizes(rng, rows, g)) for _ in range(2)]
            xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
            dense_s = None if on_cpu else dense_case(k, n, t, args.iters)
            dense_tf = dense_s and flops / dense_s / 1e12
            want = jax.jit(lambda a, b, s: pg.grouped_gemm(a, b, s, interpret=on_cpu, transpose_b=True))(
                xs[0], wt, sizes[0])
            # (kernel, tiles) -> (call(a, weights, sizes, row_ids), weights): the bf16 kernel's tiles
            # on the decoded experts, and on the first shape the W4A16 kernel's on the K-major codes
            jobs = {("bf16_transpose_b", c): (lambda a, b, s, ids, c=c: pg.grouped_gemm(
                a, b, s, cfg=c, interpret=on_cpu, transpose_b=True), wt) for c in gemm_tiles}
            if si == 0:
                jobs |= {("w4a16_kmajor", c): (lambda a, b, s, ids, c=c: wg.grouped_gemm(
                    a, b, s, cfg=c, interpret=on_cpu), w_km) for c in w4a16_tiles}
            jobs |= {("w4a16_kmajor_swap", c): (lambda a, b, s, ids, c=c: wg.grouped_gemm(
                a, b, s, cfg=c, interpret=on_cpu), w_km) for c in swap_tiles}
            t0 = time.time()
            compiled = compile_all(jobs, [(xs[0], None, sizes[0])], COMPILE_THREADS)
            print(f"# prefill sweep {shape} {t}: {len(jobs)} compiled in {time.time() - t0:.0f} s", flush=True)
            timed = {}
            for (kernel, cfg), (_, w) in jobs.items():
                row = {"shape": shape, "tokens": t, "kernel": kernel, "tiles": dataclasses.asdict(cfg),
                       "dense_matmul_TFLOPs": dense_tf}
                label = f"{kernel} {tiles_name(cfg)}"
                try:
                    f = compiled[(kernel, cfg)]
                    if isinstance(f, Exception):
                        raise f
                    row["check_err"] = _row_err(f(xs[0], w, sizes[0], None), want, rows)
                    if row["check_err"] >= CHECK_TOL:
                        raise ValueError(f"differs from the default tiles' output ({row['check_err']:.3g})")
                    sec = back_to_back_time(lambda i: f(xs[i], w, sizes[i], None), [0, 1], iters=args.iters)
                    row.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12)
                    row["frac_of_dense"] = dense_tf and row["TFLOPs"] / dense_tf
                    timed.setdefault(kernel, []).append(row)
                    print(f"prefill sweep {shape} {t} {label:24} {row['ms']:8.3f} ms "
                          f"{row['TFLOPs']:7.1f} TFLOP/s {100 * (row['frac_of_dense'] or 0):4.0f}% of dense",
                          flush=True)
                except Exception as e:  # a tile shape the compiler refuses is a result too
                    row["error"] = failure(e)
                    print(f"prefill sweep {shape} {t} {label:24} {row['error']}", flush=True)
                out["prefill_sweep"].append(row)
            dense = f"{dense_s * 1e3:.3f} ms" if dense_s else "not timed"
            for kernel, krows in timed.items():
                best = min(krows, key=lambda r: r["ms"])
                print(f"prefill sweep {shape} {t} best {kernel} {tiles_name(pg.TileConfig(**best['tiles']))} "
                      f"{best['ms']:.3f} ms {100 * (best['frac_of_dense'] or 0):.0f}% of dense (dense {dense})",
                      flush=True)
                if kernel == "bf16_transpose_b" and decode_s:  # the seam's path: decode + the best tiles
                    sec = decode_s + best["ms"] / 1e3
                    path = {"shape": shape, "tokens": t, "kernel": "path", "tiles": best["tiles"], "ms": sec * 1e3,
                            "TFLOPs": flops / sec / 1e12, "frac_of_dense": dense_tf and flops / sec / 1e12 / dense_tf}
                    out["prefill_sweep"].append(path)
                    print(f"prefill sweep {shape} {t} path = decode {decode_s * 1e3:.3f} + bf16 {best['ms']:.3f} ms "
                          f"= {path['ms']:.3f} ms {100 * (path['frac_of_dense'] or 0):.0f}% of dense", flush=True)
        save(out, args.json)
