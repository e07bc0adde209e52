"""`python -m atom_jax.bench w4a16`: the W4A16 grouped GEMM (FP4 experts decoded in the kernel)
beside the bf16 Triton kernel at DeepSeek-V4 expert shapes per rank (experts over 2 ranks), the
dense bf16 matmul of the same M x K x N, and the copy bandwidth measured in the same run.
Variants of the FP4 path: `w4a16` (decoded inside the kernel), `w4a16_swap` (the same kernel and
tiles with the swap-AB product, out^T = W^T . A^T: `TileConfig.swap_ab`), `w4a16_gemv` (no MMA:
float32 FMAs on the decoded tile, `TileConfig.gemv`, at `GEMV_TILES`), `dequant_bf16` (one XLA
decode pass, then the bf16 kernel) and `dequant_pallas` (the streaming `fp4_dequant` kernel, then
the bf16 kernel: the seam's path from `grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP` rows per expert,
which these rows decide). The decode alone is timed per shape too (`decode` rows: GB/s of
packed bytes read + bf16 bytes written, beside the same run's copy bandwidth), the kernel
beside XLA's decode pass.

Rows per rank = tokens per rank x top-6, routed uniformly over the rank's experts. GB/s counts
the expert weight bytes each kernel must stream (non-empty groups x K x N x 2 bytes for bf16,
x (1/2 + 1/32) bytes for FP4 codes + scales). The issue's targets: decode (64-256 tokens) FP4
streams >= 80% of copy bandwidth; prefill (8K tokens) >= 50% of the dense matmul rate. Each
kernel is first checked against a float32 reference on a skewed routing (empty and very large
groups); a kernel that fails (compile error, wrong result) is reported and left out, the run goes on.
`--sweep` also times other W4A16 tile shapes on the first shape, `--dequant-sweep` other
`fp4_dequant` tiles, `--prefill-sweep` the tiles of the K-major prefill path (`bench/w4a16_prefill.py`:
the bf16 kernel's with `transpose_b`, the K-major decode's). `--decode-sweep` times the W4A16 variants (`w4a16`, `w4a16_swap`,
`w4a16_gemv`, `w4a16_kmajor`, `w4a16_1mul`; `--variants` picks some) over `decode_sweep_tiles()` (and
`KMAJOR_TILES`: the MMA kernel on K-major codes, `packed.Fp4WeightsKMajor`, converted once per
shape outside the timing) at every shape and each
token count in the decode regime (< 32 rows per expert), each config first checked against the
float32 reference, configs Triton refuses reported and skipped.

    python -m atom_jax.bench w4a16 --json w4a16.json        # GPU
    python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up,pro_up --decode-sweep --json w4swap.json
    python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up,pro_up --decode-sweep --variants w4a16,w4a16_gemv
    python -m atom_jax.bench w4a16 --tokens 8192 --shapes flash_up,pro_up \
        --kernels w4a16,w4a16_kmajor,dequant_pallas,dequant_pallas_kmajor   # prefill, both code layouts
    python -m atom_jax.bench w4a16 --tokens 8192 --shapes flash_up,flash_down,pro_up \
        --kernels dequant_pallas,dequant_pallas_kmajor,dequant_pallas_kmajor_transpose --prefill-sweep
    python -m atom_jax.bench w4a16 --tiny                    # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses

from atom_jax.bench.gemm import SHAPES, TOPK, dense_case, save  # the same expert shapes per rank
FP4_BYTES_PER_WEIGHT = 0.5 + 1 / 32
CHECK_TOL = 2e-2  # max relative row error vs float32 (bf16 output rounding) a kernel must meet
DECODE_ROWS_PER_EXPERT = 32  # the decode sweep's token counts: below this many rows per expert
# The decode sweep: (block_n, block_k) at 4 warps / 3 stages, then warps / stages around the
# 128 x 256 of the decode tiles, then 256 x 256 at 8 warps; block_m 16 for `w4a16`, 8 and 16 for
# `w4a16_swap` (the rows are the swapped product's N side).
_SWEEP_NK = [(64, 256), (64, 512), (128, 128), (128, 256), (128, 512), (256, 128), (256, 256)]
_SWEEP_WARPS_STAGES = [(8, 3), (4, 2), (4, 4)]
# `w4a16_gemv` (no MMA): (block_m, block_n, block_k, warps, stages). Stages >= 2 = one step of
# prefetch in registers. Chosen so that ptxas (CUDA 13.4's, sm_90a, on pip Triton 3.9's compile of
# these kernels' Pallas TTIR: not XLA's Triton, so only indicative) spills no registers (48-210
# per thread); block_m 1-8 (padding rows cost FMAs; larger groups run as several items).
_SWEEP_GEMV = [(4, 128, 64, 4, 1), (4, 128, 64, 4, 2), (2, 128, 64, 4, 1), (2, 128, 128, 4, 1),
               (1, 128, 128, 4, 1), (4, 128, 128, 4, 1), (4, 128, 128, 8, 1), (4, 256, 64, 8, 1),
               (4, 256, 128, 8, 1), (2, 256, 64, 4, 1), (4, 128, 32, 2, 1), (4, 64, 64, 2, 1),
               (8, 128, 64, 8, 1), (8, 128, 32, 4, 1), (2, 512, 32, 4, 1)]
VARIANTS = ("w4a16", "w4a16_swap", "w4a16_gemv")
# `w4a16_kmajor`: the MMA kernel (plain or swap-AB) reading K-major codes (`packed.Fp4WeightsKMajor`:
# one 32-bit shared-memory load per four code bytes instead of four byte loads and their repacking;
# offline SASS counts in `w4a16_grouped_gemm`'s docstring). Measured 1.17-1.5x faster on an H200 (2026-12-01):
# the engine's GPU layout (`--expert-layout`).
KMAJOR = "w4a16_kmajor"
# `w4a16_1mul`: the one-multiply decoder (`grouped_gemm(..., one_multiply=True)`, exact for scale
# bytes `ONE_MUL_SCALE_BYTES`, which `random_fp4`'s are), on [K/2, N] and K-major codes.
ONE_MUL = "w4a16_1mul"
ALL_VARIANTS = (*VARIANTS, KMAJOR, ONE_MUL)
_SWEEP_ONE_MUL = [(16, 128, 256, 4, 3), (16, 64, 256, 4, 2), (16, 128, 128, 4, 3)]  # both layouts
# + the two K-major swap-AB bests of the 2026-12-01 sweep without it (64 / 256 tokens)
_SWEEP_ONE_MUL_KMAJOR_SWAP = [(8, 64, 256, 2, 3), (8, 64, 256, 2, 2), (8, 128, 128, 2, 3), (8, 128, 256, 4, 3),
                              (16, 64, 256, 2, 3),
                              # deeper pipelines and more warps per weight tile around the 64-token best (the
                              # decoder is ALU-bound near 70% of copy: more warps hide the loads' latency)
                              (8, 128, 256, 4, 4), (8, 128, 512, 4, 3), (8, 256, 256, 8, 3), (8, 128, 256, 8, 3),
                              (16, 128, 256, 4, 3), (16, 64, 256, 4, 3)]
_SWEEP_KMAJOR = [(16, 128, 256, 4, 3), (16, 128, 256, 4, 2), (16, 64, 256, 4, 3), (16, 64, 256, 4, 2),
                 (16, 128, 128, 4, 3), (16, 64, 256, 2, 3)]
# swap-AB at 1-2 warps (no warpgroup: Hopper's mma.sync, the decoded weights as its A operand from
# registers, the rows as B without register moves): 3.6-3.9 instructions per weight offline.
_SWEEP_KMAJOR_SWAP = [(8, 64, 256, 2, 3), (8, 64, 256, 2, 2), (8, 64, 128, 2, 3), (8, 128, 128, 2, 3),
                      (8, 32, 256, 1, 3), (16, 64, 256, 2, 3), (8, 128, 256, 4, 3)]


def kmajor_tiles():
    """The `w4a16_kmajor` candidates of the decode sweep (plain MMA, then swap-AB)."""
    from atom_jax.kernels.pallas_grouped_gemm import TileConfig as T
    return [T(*t) for t in _SWEEP_KMAJOR] + [T(*t, swap_ab=True) for t in _SWEEP_KMAJOR_SWAP]


def one_mul_tiles():
    """The `w4a16_1mul` candidates: (tiles, K-major codes?)."""
    from atom_jax.kernels.pallas_grouped_gemm import TileConfig as T
    return ([(T(*t), False) for t in _SWEEP_ONE_MUL] + [(T(*t), True) for t in _SWEEP_ONE_MUL]
            + [(T(*t, swap_ab=True), True) for t in _SWEEP_ONE_MUL_KMAJOR_SWAP])


def decode_sweep_tiles(variants=VARIANTS):
    """The W4A16 decode sweep's tiles of `variants` (w4a16: 13, w4a16_swap: 22, w4a16_gemv: 15)."""
    from atom_jax.kernels.pallas_grouped_gemm import TileConfig as T
    tiles = []
    for name, swap, block_ms in (("w4a16", False, (16,)), ("w4a16_swap", True, (8, 16))):
        if name not in variants:
            continue
        for bm in block_ms:
            tiles += [T(bm, bn, bk, 4, 3, swap) for bn, bk in _SWEEP_NK]
            tiles += [T(bm, 128, 256, w, st, swap) for w, st in _SWEEP_WARPS_STAGES]
            tiles.append(T(bm, 256, 256, 8, 3, swap))
            if not swap:  # 5 blocks per SM by registers offline (96 and 180 per thread): occupancy
                tiles += [T(bm, 64, 256, 4, 2), T(bm, 64, 256, 2, 3)]
    if "w4a16_gemv" in variants:
        tiles += [T(*t, gemv=True) for t in _SWEEP_GEMV]
    return tiles


def variant(cfg) -> str:
    return "w4a16_gemv" if cfg.gemv else "w4a16_swap" if cfg.swap_ab else "w4a16"


def tiles_name(cfg) -> str:
    kind = (" gemv" if getattr(cfg, "gemv", False) else " swap" if getattr(cfg, "swap_ab", False) else
            " gather" if getattr(cfg, "gather_codes", False) else "")
    return "x".join(str(v) for v in dataclasses.astuple(cfg)[:5] if not isinstance(v, bool)) + kind


def failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def random_fp4(key, g, k, n):
    """Random packed experts on the device: uniform codes, scales 2**-8 .. 2**-5."""
    import jax
    import jax.numpy as jnp

    from atom_jax.kernels.packed import Fp4Weights
    kc, ks = jax.random.split(key)
    codes = jax.random.randint(kc, (g, k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.randint(ks, (g, k // 32, n), 119, 123, jnp.int32).astype(jnp.uint8)
    return Fp4Weights(codes, scales)


def _check_case(k, n, g, rows, rng):
    """A skewed routing (empty and very large groups): rows x, packed experts w4, sizes and the
    float32 reference (experts decoded one at a time: no float32 copy of the whole stack)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from atom_jax.bench.routings import skewed_sizes
    from atom_jax.kernels.packed import Fp4Weights, fp4_dequantize
    sizes = skewed_sizes(rng, rows, g)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w4 = random_fp4(jax.random.key(3), g, k, n)
    xf = np.asarray(x, np.float32)
    ends = np.cumsum(sizes)
    ref = np.zeros((rows, n), np.float32)
    for e in np.flatnonzero(sizes):
        dense = np.asarray(fp4_dequantize(Fp4Weights(w4.codes[e], w4.scales[e]), jnp.float32))
        ref[ends[e] - sizes[e]:ends[e]] = xf[ends[e] - sizes[e]:ends[e]] @ dense
    return {"x": x, "w4": w4, "sizes": jnp.asarray(sizes), "ref": ref, "valid": int(ends[-1])}


def _check_error(case, fn, packed: bool = True, k_major: bool = False) -> float:
    """Max relative row error of fn(x, weights, sizes) vs the case's float32 reference (weights
    packed, K-major codes when `k_major`, or decoded to bf16 for the bf16 kernel)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from atom_jax.kernels.packed import fp4_dequantize, to_k_major
    w = case["w4"] if packed else fp4_dequantize(case["w4"], jnp.bfloat16)
    w = to_k_major(w) if k_major else w
    got = np.asarray(jax.jit(fn)(case["x"], w, case["sizes"]), np.float32)
    ref = case["ref"]
    err = np.linalg.norm(got - ref, axis=1) / (np.linalg.norm(ref, axis=1) + 1e-6)
    return float(err[:case["valid"]].max())


def _check(k, n, g, rows, rng, fns):
    """Max relative row error of each kernel vs float32 on a skewed routing, or its failure.
    fns: name -> (fn, packed weights?, K-major codes?)."""
    case = _check_case(k, n, g, rows, rng)
    out = {}
    for name, (fn, packed, k_major) in fns.items():
        try:
            out[name] = _check_error(case, fn, packed, k_major)
        except Exception as e:  # a kernel the compiler refuses is a result too
            out[name] = failure(e)
    return out


def _time(fn, w, g, k, tokens, rng, iters):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from atom_jax.bench.routings import uniform_sizes
    from atom_jax.bench.timing import back_to_back_time
    rows = tokens * TOPK
    sizes = [jnp.asarray(uniform_sizes(rng, rows, g)) for _ in range(2)]
    xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
    f = jax.jit(fn)
    sec = back_to_back_time(lambda i: f(xs[i], w, sizes[i]), [0, 1], iters=iters)
    nonempty = sum(int((np.asarray(s) > 0).sum()) for s in sizes) / 2
    return sec, nonempty


def _time_decode(fn, w, ceil, iters, **fields):
    """One decode of experts `w` to bf16: ms, GB/s of packed bytes read + bf16 bytes written."""
    import jax

    from atom_jax.bench.timing import back_to_back_time
    from atom_jax.kernels.fp4_dequant import bytes_moved
    f = jax.jit(fn)
    sec = back_to_back_time(lambda v: f(v), [w], iters=iters)
    gbps = bytes_moved(w.shape) / sec / 1e9
    return dict(fields, ms=sec * 1e3, GBps=gbps, frac_of_copy=ceil["copy_GBps"] and gbps / ceil["copy_GBps"])


def _rate_row(base, name, sec, weight_bytes, flops, ceil, dense_tf, bf16_sec):
    """One timed kernel's row: ms, TFLOP/s, GB/s of expert weight bytes, their fractions of the
    dense matmul rate and of the copy bandwidth, speed-up over the bf16 kernel."""
    row = dict(base, kernel=name, ms=sec * 1e3, TFLOPs=flops / sec / 1e12, GBps=weight_bytes / sec / 1e9)
    row["frac_of_dense"] = dense_tf and row["TFLOPs"] / dense_tf
    row["frac_of_copy"] = ceil["copy_GBps"] and row["GBps"] / ceil["copy_GBps"]
    row["speedup_vs_bf16"] = bf16_sec and bf16_sec / sec
    return row


def _decode_sweep(args, shapes, tokens, fp4, rng, ceil, out):
    """Both W4A16 variants over `decode_sweep_tiles()` at every shape and decode token count:
    each config checked on a skewed routing of the largest such count first; one that fails to
    compile or misses CHECK_TOL is reported and not timed. Prints each variant's best."""
    import jax

    from atom_jax.kernels.packed import to_k_major
    from atom_jax.kernels.pallas_grouped_gemm import TileConfig as T
    variants = args.variants.split(",")
    if unknown := set(variants) - set(ALL_VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    # (variant name, tiles, K-major codes?, one-multiply decoder?)
    cfgs = [(variant(c), c, False, False) for c in decode_sweep_tiles(variants)]
    cfgs += [(KMAJOR, c, True, False) for c in kmajor_tiles()] if KMAJOR in variants else []
    cfgs += [(ONE_MUL, c, km, True) for c, km in one_mul_tiles()] if ONE_MUL in variants else []
    if args.tiny:
        cfgs = [(variant(c), c, False, False) for c in (T(8, 32, 64, 4, 2, False), T(8, 32, 64, 4, 2, True),
                                                        T(4, 32, 64, 4, 2, False, True)) if variant(c) in variants]
        cfgs += [(KMAJOR, T(8, 32, 64, 4, 2), True, False)] if KMAJOR in variants else []
        cfgs += [(ONE_MUL, T(8, 32, 64, 4, 2, True), True, True)] if ONE_MUL in variants else []
    for shape, (g, k, n) in shapes.items():
        decode_tokens = [t for t in tokens if t * TOPK / g < DECODE_ROWS_PER_EXPERT] or tokens[:1]
        case = _check_case(k, n, g, max(decode_tokens) * TOPK, rng)
        w_fp4 = random_fp4(jax.random.key(8), g, k, n)
        if any(km for _, _, km, _ in cfgs):  # converted once, outside the timing (as at load)
            case_km, w_km = dict(case, w4=to_k_major(case["w4"])), to_k_major(w_fp4)
        best = {}
        for name, cfg, k_major, one_mul in cfgs:
            fn = fp4(cfg, one_multiply=one_mul)
            base = {"shape": shape, "kernel": name, "tiles": dataclasses.asdict(cfg), "k_major": k_major,
                    "one_multiply": one_mul}
            label = tiles_name(cfg) + (" kmajor" if k_major else "") + (" 1mul" if one_mul else "")
            try:
                err = _check_error(case_km if k_major else case, fn)
            except Exception as e:  # a tile shape the compiler refuses is a result too
                err = failure(e)
            if not (isinstance(err, float) and err < CHECK_TOL):
                out["decode_sweep"].append(dict(base, check_err=err,
                                                error=err if isinstance(err, str) else "wrong"))
                print(f"decode sweep {shape} {label}: {err if isinstance(err, str) else f'wrong ({err:.3g})'}",
                      flush=True)
                continue
            for t in decode_tokens:
                try:
                    sec, nonempty = _time(fn, w_km if k_major else w_fp4, g, k, t, rng, args.iters)
                except Exception as e:
                    out["decode_sweep"].append(dict(base, tokens=t, check_err=err, error=failure(e)))
                    print(f"decode sweep {shape} {t} {label}: {failure(e)}", flush=True)
                    continue
                row = _rate_row(dict(base, tokens=t, check_err=err), name, sec,
                                nonempty * k * n * FP4_BYTES_PER_WEIGHT, 2.0 * t * TOPK * k * n, ceil, None, None)
                out["decode_sweep"].append(row)
                key = (t, name)
                if key not in best or row["ms"] < best[key][0]["ms"]:
                    best[key] = (row, label)
                print(f"decode sweep {shape} {t} {label:29} {row['ms']:8.3f} ms {row['GBps']:6.0f} GB/s "
                      f"{100 * (row['frac_of_copy'] or 0):4.0f}% of copy (check {err:.1e})", flush=True)
        for (t, name), (row, label) in sorted(best.items(), key=lambda kv: kv[0]):
            other = best.get((t, "w4a16"))
            vs = f"  {row['ms'] / other[0]['ms']:.2f}x w4a16's best time" if other and name != "w4a16" else ""
            print(f"decode sweep {shape} {t} best {name:10} {label:29} {row['ms']:8.3f} ms "
                  f"{row['GBps']:6.0f} GB/s {100 * (row['frac_of_copy'] or 0):4.0f}% of copy{vs}", flush=True)
        save(out, args.json)


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from atom_jax.bench.timing import device_ceilings
    from atom_jax.kernels import fp4_dequant as fd
    from atom_jax.kernels import pallas_grouped_gemm as pg
    from atom_jax.kernels import w4a16_grouped_gemm as wg
    from atom_jax.kernels.packed import fp4_dequantize, to_k_major

    on_cpu = jax.default_backend() == "cpu"
    rng = np.random.default_rng(0)
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.tiny:
        shapes, tokens = {"tiny_up": (4, 128, 128)}, [8, 32]
    ceil = {"copy_GBps": None, "matmul_TFLOPs": None} if on_cpu else device_ceilings()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil, "topk": TOPK,
           "checks": {}, "results": [], "decode": [], "seam_choice": [], "sweep": [], "decode_sweep": [],
           "dequant_sweep": []}
    print(f"# {out['device']}  copy {ceil['copy_GBps']} GB/s  matmul {ceil['matmul_TFLOPs']} TFLOP/s", flush=True)

    def bf16(rows, w, sizes):  # (its tiles by rows per expert, as the seam's: pg.grouped_gemm's default)
        return pg.grouped_gemm(rows, w, sizes, interpret=on_cpu)

    def fp4(cfg=None, decode=None, one_multiply=False):
        return lambda rows, w, sizes: wg.grouped_gemm(rows, w, sizes, cfg=cfg, interpret=on_cpu, decode=decode,
                                                      one_multiply=one_multiply)

    def fp4_swap(rows, w, sizes):  # w4a16's own tiles (by rows per expert), the swap-AB product
        cfg = dataclasses.replace(wg.default_tiles(rows.shape[0] / w.shape[0]), swap_ab=True)
        return wg.grouped_gemm(rows, w, sizes, cfg=cfg, interpret=on_cpu)

    def dequant_bf16(rows, w, sizes):  # one XLA decode pass, then the bf16 kernel
        return bf16(rows, fp4_dequantize(w, rows.dtype), sizes)

    def dequant_pallas(rows, w, sizes):  # the streaming decode kernel, then the bf16 kernel
        return bf16(rows, fd.dequantize(w, interpret=on_cpu), sizes)

    def dequant_pallas_kmajor(rows, w, sizes):  # K-major codes -> [E, N, K] (no transpose), transpose_b
        return pg.grouped_gemm(rows, fd.dequantize_k_major(w, interpret=on_cpu), sizes, interpret=on_cpu,
                               transpose_b=True)

    # On a GPU the platform's decoder (`w4a16`: ptx on CUDA) runs beside the portable one forced.
    # `w4a16_gemv`: the no-MMA variant at its tiles (wg.GEMV_TILES) at every token count.
    # `*_kmajor`: the same calls on K-major codes (`packed.Fp4WeightsKMajor`, the engine's
    # `--expert-layout kmajor`; converted once per shape, outside the timing): w4a16_kmajor at its
    # own default tiles (`default_tiles(..., k_major=True)`); dequant_pallas_kmajor the seam's
    # K-major prefill path (the no-transpose decode to [E, N, K], the bf16 kernel with
    # `transpose_b`), dequant_pallas_kmajor_transpose the earlier one (each K-major code tile
    # transposed in the decode kernel to write [E, K, N]).
    fp4_kernels = {"w4a16": fp4(), "w4a16_kmajor": fp4(), "w4a16_swap": fp4_swap, "w4a16_gemv": fp4(wg.GEMV_TILES),
                   "dequant_bf16": dequant_bf16, "dequant_pallas": dequant_pallas,
                   "dequant_pallas_kmajor": dequant_pallas_kmajor, "dequant_pallas_kmajor_transpose": dequant_pallas}
    if not on_cpu:
        fp4_kernels["w4a16_alu"] = fp4(decode="alu")
    if args.kernels:
        keep = args.kernels.split(",")
        if unknown := set(keep) - set(fp4_kernels):
            raise SystemExit(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(fp4_kernels)}")
        fp4_kernels = {name: fn for name, fn in fp4_kernels.items() if name in keep}
    k_major = {name: "_kmajor" in name for name in fp4_kernels}

    for shape, (g, k, n) in shapes.items():
        out["checks"][shape] = _check(k, n, g, 40 if args.tiny else 8 * g, rng,
                                      {"bf16": (bf16, False, False),
                                       **{n: (f, True, k_major[n]) for n, f in fp4_kernels.items()}})
        print(f"check {shape}: max row rel err {out['checks'][shape]}", flush=True)
    failed = {name for errs in out["checks"].values() for name, e in errs.items()
              if not (isinstance(e, float) and e < CHECK_TOL)}
    if failed:
        print(f"left out of the timings (failed or wrong on some shape): {sorted(failed)}", flush=True)
    decoders = {"fp4_dequant": lambda w: fd.dequantize(w, interpret=on_cpu),
                "xla_dequant": lambda w: fp4_dequantize(w, jnp.bfloat16)}
    if any(k_major.values()):
        decoders["fp4_dequant_kmajor"] = lambda w: fd.dequantize_k_major(w, interpret=on_cpu)
    for shape, (g, k, n) in shapes.items():
        w_fp4 = random_fp4(jax.random.key(8), g, k, n)
        for name, fn in decoders.items():
            w = to_k_major(w_fp4) if name.endswith("_kmajor") else w_fp4
            row = _time_decode(fn, w, ceil, args.iters, shape=shape, kernel=name)
            out["decode"].append(row)
            print(f"decode {shape:10} {name:14} {row['ms']:8.3f} ms {row['GBps']:7.0f} GB/s "
                  f"{100 * (row['frac_of_copy'] or 0):4.0f}% of copy", flush=True)
    save(out, args.json)
    print(f"{'shape':10} {'tok':>6} {'kernel':21} {'ms':>8} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>7} {'%copy':>5} {'x bf16':>6}")
    for shape, (g, k, n) in shapes.items():
        w_bf16 = jax.random.normal(jax.random.key(7), (g, k, n), jnp.bfloat16) * 0.02
        w_fp4 = random_fp4(jax.random.key(8), g, k, n)
        w_km = to_k_major(w_fp4) if any(k_major.values()) else None
        for t in tokens:
            flops = 2.0 * t * TOPK * k * n
            dense_s = None if on_cpu else dense_case(k, n, t, args.iters)
            dense_tf = dense_s and flops / dense_s / 1e12
            base = {"shape": shape, "groups": g, "K": k, "N": n, "tokens": t, "rows": t * TOPK,
                    "dense_matmul_ms": dense_s and dense_s * 1e3, "dense_matmul_TFLOPs": dense_tf}
            secs = {}
            runs = [("bf16", bf16, w_bf16, 2.0)] + [(n, f, w_km if k_major[n] else w_fp4, FP4_BYTES_PER_WEIGHT)
                                                    for n, f in fp4_kernels.items()]
            for name, fn, w, bpw in runs:
                if name in failed:
                    continue
                try:
                    sec, nonempty = _time(fn, w, g, k, t, rng, args.iters)
                except Exception as e:
                    out["results"].append(dict(base, kernel=name, error=failure(e)))
                    print(f"{shape:10} {t:6d} {name:21} {failure(e)}", flush=True)
                    continue
                secs[name] = sec
                out["results"].append(row := _rate_row(base, name, sec, nonempty * k * n * bpw, flops, ceil,
                                                       dense_tf, secs.get("bf16")))
                print(f"{shape:10} {t:6d} {name:21} {row['ms']:8.3f} {row['TFLOPs']:8.1f} "
                      f"{100 * (row['frac_of_dense'] or 0):5.0f} {row['GBps']:7.0f} "
                      f"{100 * (row['frac_of_copy'] or 0):5.0f} {row['speedup_vs_bf16'] or 0:6.2f}", flush=True)
            if dense_s:
                print(f"{shape:10} {t:6d} {'dense':21} {dense_s * 1e3:8.3f} {dense_tf:8.1f}", flush=True)
            for other, base_name in (("w4a16_swap", "w4a16"), ("w4a16_gemv", "w4a16"), ("w4a16_kmajor", "w4a16"),
                                     ("dequant_pallas_kmajor", "dequant_pallas"),
                                     ("dequant_pallas_kmajor_transpose", "dequant_pallas"),
                                     ("dequant_pallas_kmajor", "dequant_pallas_kmajor_transpose")):
                if base_name in secs and other in secs:
                    print(f"{shape:10} {t:6d} {other} / {base_name} time {secs[other] / secs[base_name]:.2f}",
                          flush=True)
            # the seam's choice at this rows-per-expert (grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP), per
            # code layout: the decode-then-bf16 path vs the in-kernel W4A16 one
            for layout, dq, w4 in (("nmajor", "dequant_pallas", "w4a16"),
                                   ("kmajor", "dequant_pallas_kmajor", "w4a16_kmajor")):
                if dq not in secs or w4 not in secs:
                    continue
                faster = dq if secs[dq] < secs[w4] else w4
                out["seam_choice"].append({"shape": shape, "tokens": t, "rows_per_expert": t * TOPK / g,
                                           "layout": layout, "faster": faster, "dequant_over_w4a16": secs[dq] / secs[w4]})
                print(f"{shape:10} {t:6d} faster: {faster} at {t * TOPK / g:.1f} rows/expert "
                      f"({dq} / {w4} time {secs[dq] / secs[w4]:.2f})", flush=True)
        save(out, args.json)
    if args.decode_sweep:
        _decode_sweep(args, shapes, tokens, fp4, rng, ceil, out)
    if args.prefill_sweep:
        from atom_jax.bench.w4a16_prefill import prefill_sweep
        prefill_sweep(args, shapes, tokens, ceil, out, on_cpu, save)
    if args.dequant_sweep:
        D = fd.DequantTiles
        dcfgs = [D(64, 512, 4, 1), D(32, 1024, 4, 1), D(128, 256, 4, 1), D(64, 1024, 8, 1), D(128, 512, 8, 1),
                 D(256, 256, 8, 1), D(64, 512, 4, 2), D(256, 1024, 8, 1)]
        if args.tiny:
            dcfgs = [D(32, 64, 4, 1)]
        first, (g, k, n) = next(iter(shapes.items()))
        w_fp4 = random_fp4(jax.random.key(8), g, k, n)
        for cfg in dcfgs:
            tiles = tiles_name(cfg)
            try:
                row = _time_decode(lambda w, c=cfg: fd.dequantize(w, c, interpret=on_cpu), w_fp4, ceil, args.iters,
                                   shape=first, tiles=dataclasses.asdict(cfg))
                print(f"dequant sweep {tiles} {row['ms']:.3f} ms {row['GBps']:.0f} GB/s", flush=True)
            except Exception as e:  # a tile shape the compiler rejects is a result too
                row = {"shape": first, "tiles": dataclasses.asdict(cfg), "error": failure(e)}
                print(f"dequant sweep {tiles} {row['error']}", flush=True)
            out["dequant_sweep"].append(row)
    if args.sweep:
        T = pg.TileConfig
        cfgs = [T(16, 128, 256, 4, 3), T(16, 256, 512, 4, 3), T(16, 256, 128, 4, 4), T(32, 128, 256, 4, 3),
                T(64, 128, 128, 4, 3), T(128, 128, 64, 8, 3), T(128, 256, 64, 8, 3), T(128, 128, 128, 8, 4)]
        if args.tiny:
            cfgs = [T(16, 64, 64, 4, 2)]
        first, (g, k, n) = next(iter(shapes.items()))
        w_fp4 = random_fp4(jax.random.key(8), g, k, n)
        for t in tokens:
            for cfg in cfgs:
                row = {"shape": first, "tokens": t, "tiles": dataclasses.asdict(cfg)}
                try:
                    sec, nonempty = _time(fp4(cfg), w_fp4, g, k, t, rng, args.iters)
                    row.update(ms=sec * 1e3, GBps=nonempty * k * n * FP4_BYTES_PER_WEIGHT / sec / 1e9,
                               TFLOPs=2.0 * t * TOPK * k * n / sec / 1e12)
                except Exception as e:  # a tile shape the compiler rejects is a result too
                    row["error"] = failure(e)
                out["sweep"].append(row)
                print("sweep", t, tiles_name(cfg),
                      row.get("error") or f"{row['ms']:.3f} ms {row['GBps']:.0f} GB/s {row['TFLOPs']:.1f} TF", flush=True)
    save(out, args.json)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("w4a16", help="W4A16 (FP4 experts) grouped GEMM vs bf16, copy and matmul rates",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="64,128,256,1024,8192", help="tokens per rank (x top-6 rows)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time other W4A16 tiles on the first shape")
    p.add_argument("--decode-sweep", action="store_true",
                   help="also time the W4A16 variants (--variants) over decode_sweep_tiles() at every shape "
                        "and decode token count (< 32 rows per expert), each checked against float32 first")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help="the decode sweep's variants: w4a16 (MMA), w4a16_swap (swap-AB MMA), w4a16_gemv (no MMA), "
                        "w4a16_kmajor (the MMA kernel on K-major codes), w4a16_1mul (the one-multiply decoder)")
    p.add_argument("--kernels", default="",
                   help="the main table's FP4 kernels, comma list (default: all): w4a16, w4a16_kmajor (K-major codes, "
                        "their default tiles), w4a16_swap, w4a16_gemv, w4a16_alu (GPU), dequant_bf16, dequant_pallas, "
                        "dequant_pallas_kmajor (the no-transpose K-major path: [E, N, K] decode, transpose_b), "
                        "dequant_pallas_kmajor_transpose (the decode transposing K-major tiles); the bf16 kernel always runs")
    p.add_argument("--dequant-sweep", action="store_true", help="also time other fp4_dequant tiles on the first shape")
    p.add_argument("--prefill-sweep", action="store_true",
                   help="also time the K-major prefill path's tiles: the bf16 kernel's with transpose_b (every shape, "
                        ">= 32 rows per expert) and dequantize_k_major's (first shape); bench/w4a16_prefill.py")
    p.add_argument("--tiny", action="store_true", help="small shapes, CPU smoke run")
    p.add_argument("--json")
    p.set_defaults(func=run)
    return p
