"""`python -m atom_jax.bench mhc`: the mHC merge of a block's output followed by the next block's
mixes, as XLA runs it (`models.hyper.hc_merge` then `hc_mixes`: the "jnp" row) against the one-pass
kernel (`kernels/hc_merge_mix.py`) at its default and other tiles, same inputs, same run:

    python -m atom_jax.bench mhc --tokens 1024,8192 --json mhc_h200.json        # GPU, V4-Flash dims
    python -m atom_jax.bench mhc --tiny                                          # CPU smoke run

Tiles: BTxBDxWARPSxSTAGESxCHUNK (tokens per program, stream columns per step, warps, pipeline stages,
stream columns per program).
Per token count and variant: ms per call (jitted, back to back, best of 5 batches), the bytes the
merge must move (streams and output read, new streams written) over that time, and the largest
difference from the jnp row (new streams: in steps of their dtype at the largest element; mixes:
relative to the largest)."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.timing import best_time


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("mhc", help="mHC merge + mixes: XLA vs the one-pass kernel, per token count",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="comma list (default 1024,8192; --tiny 37)")
    ap.add_argument("--tiles", default="default,16x64x4x3x512,32x64x4x3x256,32x64x4x3x1024,64x64x8x3x512,32x128x8x2x512",
                    help="comma list of kernel tiles BTxBDxWARPSxSTAGESxCHUNK or default")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (the kernel interpreted)")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def tiles_of(spec: str) -> dict:
    """'default' -> {} (the module's), 'BTxBDxWxSxC' -> merge_mix keyword arguments."""
    if spec == "default":
        return {}
    try:
        bt, bd, w, s, c = (int(x) for x in spec.split("x"))
    except ValueError:
        raise SystemExit(f"--tiles: {spec!r} is not 'default' or BTxBDxWARPSxSTAGESxCHUNK (e.g. 32x64x4x3x512)") from None
    return {"block_t": bt, "block_d": bd, "num_warps": w, "num_stages": s, "chunk_d": c}


def inputs(tokens: int, n: int, d: int, m: int, dtype, seed: int = 0):
    from atom_jax.models import hyper
    rng = np.random.default_rng(seed)
    streams = jnp.asarray(rng.standard_normal((tokens, n, d)) * 3, dtype)
    out = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
    post = jnp.asarray(rng.random((tokens, n)) * 2, jnp.float32)
    comb = hyper.sinkhorn_reference(jnp.asarray(rng.standard_normal((tokens, n, n)) * 4, jnp.float32), 20, 1e-6)
    fn = jnp.asarray(rng.standard_normal((n * d, m)) / 16, jnp.float32)
    return streams, out, post, comb, fn


def rounding_step(x: np.ndarray, dtype) -> np.ndarray:
    """The spacing of `dtype` (bf16: 8 significant bits; float32: np.spacing) at each |x|."""
    mag = np.maximum(np.abs(x), np.finfo(np.float32).tiny)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return np.exp2(np.floor(np.log2(mag)) - 7)
    return np.spacing(mag.astype(np.float32))


def run_cli(args) -> int:
    from atom_jax.config import tiny, v4_flash
    from atom_jax.kernels import hc_merge_mix
    from atom_jax.models import hyper

    cfg = tiny() if args.tiny else v4_flash()
    n, d, m = cfg.hc_mult, cfg.hidden_size, (2 + cfg.hc_mult) * cfg.hc_mult
    eps = cfg.rms_norm_eps
    interpret = jax.default_backend() == "cpu"
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    tokens = [int(x) for x in (args.tokens or ("37" if args.tiny else "1024,8192")).split(",")]
    variants = [(v, tiles_of(v)) for v in args.tiles.split(",")]

    def jnp_path(s, o, p, c, f):
        merged = hyper.hc_merge(s, o, p, c)
        return merged, hyper.hc_mixes(merged, f, eps)

    def kernel_path(tiles):
        def run(s, o, p, c, f):
            merged, products, squares = hc_merge_mix.merge_mix(s, o, p, c, f, interpret=interpret, **tiles)
            return merged, hc_merge_mix.normed_mixes(products, squares, n * d, eps)
        return run

    rows = []
    print(f"{'tokens':>7} {'variant':>20} {'ms':>8} {'GB/s':>7} {'streams diff (steps)':>20} {'mixes rel diff':>15}")
    for t in tokens:
        args_t = inputs(t, n, d, m, dtype)
        moved = (2 * args_t[0].nbytes + args_t[1].nbytes)  # streams in and out, the output in
        ref = None
        for name, fn in [("jnp", jnp_path)] + [(v, kernel_path(tiles)) for v, tiles in variants]:
            f = jax.jit(fn)
            try:
                got = jax.block_until_ready(f(*args_t))
                sec = best_time(lambda _: f(*args_t), iters=args.iters if not interpret else 1,
                                repeats=5 if not interpret else 1)
            except Exception as e:  # a tile the kernel cannot compile: reported, the others still run
                print(f"{t:7d} {name:>20} failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append({"tokens": t, "variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
                continue
            if ref is None:
                ref = got
            s_ref = np.asarray(ref[0], np.float32)  # in steps of the dtype at the largest element
            s_diff = float(np.max(np.abs(np.asarray(got[0], np.float32) - s_ref)) / rounding_step(np.abs(s_ref).max(), dtype))
            mix_ref = np.asarray(ref[1])
            m_diff = float(np.max(np.abs(np.asarray(got[1]) - mix_ref)) / np.max(np.abs(mix_ref)))
            row = {"tokens": t, "variant": name, "ms": round(sec * 1e3, 4), "GBps": round(moved / sec / 1e9, 1),
                   "streams_diff_steps": s_diff, "mixes_rel_diff": m_diff}
            rows.append(row)
            print(f"{t:7d} {name:>20} {row['ms']:8.4f} {row['GBps']:7.0f} {s_diff:20.3f} {m_diff:15.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "n": n, "d": d, "m": m,
                       "dtype": jnp.dtype(dtype).name, "rows": rows}, fh, indent=1)
    return 0
