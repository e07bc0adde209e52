"""`python -m atom_jax.bench attention`: the sparse attention kernel alone, per mode and tile
variant, at one prefill chunk near a long context (V4-Flash dims: 64 query heads, one 512-wide
key/value head, a 128-row window, 512 selected CSA entries):

    python -m atom_jax.bench attention --attention-tiles default,64x128x8x1x0x1x1x4x1 \\
        --json attention_h200.json                                   # GPU: 8K chunk at 120K
    python -m atom_jax.bench attention --tiny                        # CPU smoke run (interpreted)

Modes (kernels/sparse_attention.py): `all` (an HCA layer: the window + every visible entry, 1/128
of the context), `list` (a CSA layer: the window + the indexer's selection, random sorted
entries below each token's visible count), `none` (a sliding layer: the window alone). Each
(tiles, mode) is one jitted call, timed alone (median of --iters after a warm-up; compile time
reported beside it). Per row: ms per call, the key blocks a program steps through (window +
entries, averaged over the chunk's tokens), and the microseconds one such step takes if every
SM runs one program at a time (ms / (programs / SMs) / steps; the kernels hold one program per
SM at V4-Flash dims), the number the tile options are meant to move; with `default` among the
specs, each row's ms over the default's for its mode (of_default). --attention-tiles as in
`bench long-context --attention-tiles`: HxKxW[xS[xP[xD[xT[xC[xR[xO[xF]]]]]]]] (heads x keys per step x
warps, stages, prefetch 0/1, value-dim blocks, transpose 0/1, head-dim pieces, prefetch_rows 0/1,
one_window_load 0/1, fuse_rope 0/1: AttentionTiles). The session-11 candidates (offline counts in AttentionTiles):

    python -m atom_jax.bench attention --attention-tiles \
        default,64x64x8x1x0,64x128x8x1x0x1x1,64x128x8x1x0x1x1x4,64x128x8x1x0x1x1x4x1,64x128x8x1x0x1x1x4x1x1

--tiny: 16 heads x 64 dims, a 32-token chunk at 600, the kernel interpreted on CPU (a check that
the wiring runs, and each row's error against the jnp reference; its times measure nothing)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.long_context import attention_tiles
from atom_jax.bench.timing import median_time

MODES = ("all", "list", "none")
RATIO = {"all": 128, "list": 4}  # compression ratio of the layer kind each mode serves
V4 = dict(tokens=8192, start=120 * 1024, heads=64, dim=512, window=128, selected=512, page_tokens=128, rope=64)
TINY = dict(tokens=32, start=600, heads=16, dim=64, window=16, selected=16, page_tokens=128, rope=16)
NORM_EPS = 1e-6


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("attention", help="the sparse attention kernel alone per mode (HCA all, CSA list, "
                               "sliding none) and tile variant at one chunk near a long context (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention-tiles", default="default",
                    help="comma list of tile specs: default or HxKxW[xS[xP[xD[xT[xC[xR[xO[xF]]]]]]]], as bench "
                    "long-context's (default: default)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of all,list,none (default: all three)")
    ap.add_argument("--tokens", type=int, default=None, help="chunk tokens (default 8192; --tiny 32)")
    ap.add_argument("--start", type=int, default=None, help="context before the chunk (default 122880; --tiny 600)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes, the kernel interpreted")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def _inputs(dims: dict, dtype, seed: int = 0):
    """One sequence's chunk [start, start + tokens) in slot 0 of 2, a shuffled page table, the
    ring holding the window before the chunk, and per mode its pool, visible counts, selection."""
    from atom_jax.cache import pack_chunks
    from atom_jax.config import yarn_inv_freq
    from atom_jax.models.cache_reads import visible_counts
    from atom_jax.models.layers import rope_cos_sin

    rng = np.random.default_rng(seed)
    t, start, h, d, win, pt_tok = (dims[k] for k in ("tokens", "start", "heads", "dim", "window", "page_tokens"))
    slots = 2
    b = {k: jnp.asarray(v) for k, v in pack_chunks([(0, start, np.zeros(t, np.int32), True)], t, slots)
         .arrays().items()}
    max_pages = -(-(start + t) // pt_tok)
    page_table = jnp.asarray(rng.permutation(slots * max_pages).reshape(slots, max_pages).astype(np.int32))
    ring_pos = np.full((slots, win), -1, np.int32)
    for p in range(max(0, start - win), start):
        ring_pos[0, p % win] = p
    common = dict(q=jnp.asarray(rng.standard_normal((t, h, d)), dtype),
                  kv=jnp.asarray(rng.standard_normal((t, d)), dtype),
                  ring_kv=jnp.asarray(rng.standard_normal((slots, win, d)), dtype), ring_pos=jnp.asarray(ring_pos),
                  b=b, sinks=jnp.asarray(rng.standard_normal(h), jnp.float32),
                  # plain RoPE at theta 10000 (the kernel's cost does not depend on YaRN)
                  rope=rope_cos_sin(jnp.arange(start, start + t), yarn_inv_freq(dims["rope"], 10000.0, None)))
    modes = {"none": {}}
    for mode, ratio in RATIO.items():
        epp = pt_tok // ratio
        nv = visible_counts(b, ratio)
        sel = None
        if mode == "list":
            hi = np.maximum(np.asarray(nv), 1)[:, None]
            sel = jnp.asarray(np.sort(rng.integers(0, hi, size=(t, dims["selected"])), axis=1).astype(np.int32))
        modes[mode] = dict(pool=jnp.asarray(rng.standard_normal((slots * max_pages * epp, d)), dtype),
                           page_table=page_table, epp=epp, n_visible=nv, selected=sel)
    return common, modes


def key_steps(mode: str, tiles, window: int, n_visible: np.ndarray, selected: int) -> float:
    """Key blocks one program steps through, averaged over the tokens: the window's blocks and
    the entries' (every visible one for `all`, the selection for `list`)."""
    bk = tiles.block_k
    steps = -(-window // bk)
    if mode == "all":
        return steps + float(np.mean(-(-n_visible // bk)))
    return steps + (-(-selected // bk) if mode == "list" else 0)


def run_cli(args) -> int:
    from atom_jax.kernels import sparse_attention as sa
    from atom_jax.models.cached_attention import reference_attend

    dims = dict(TINY if args.tiny else V4)
    dims.update({k: v for k, v in (("tokens", args.tokens), ("start", args.start)) if v is not None})
    interpret = jax.default_backend() == "cpu"
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: {args.modes!r}: each of {', '.join(MODES)}")
    specs = args.attention_tiles.split(",")
    tiles_of = {s: attention_tiles(s) or sa.TILES for s in specs}  # parsed up front: a bad spec fails first
    common, per_mode = _inputs(dims, dtype)
    dev = jax.devices()[0]
    sms = getattr(dev, "core_count", None) or 1
    scale = dims["dim"] ** -0.5
    rows = []
    for spec, tiles in tiles_of.items():
        for mode in modes:
            kw = per_mode[mode]
            fn = jax.jit(lambda c, kw=kw, tiles=tiles: sa.attend(
                c["q"], c["kv"], c["ring_kv"], c["ring_pos"], c["b"], c["sinks"], scale, tiles=tiles, splits=1,
                interpret=interpret, rope=c["rope"], norm_eps=NORM_EPS, **kw))
            t0 = time.perf_counter()
            try:
                out = jax.block_until_ready(fn(common))
            except Exception as e:  # noqa: BLE001 (a variant that does not compile, e.g. too much shared memory, is a row)
                rows.append(dict(tiles=spec, mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"{spec:>20} {mode:>4}: {rows[-1]['error'][:200]}", flush=True)
                continue
            compile_s = time.perf_counter() - t0
            med, _ = median_time(fn, [common], iters=args.iters, warmup=1)
            bh = min(tiles.block_h, max(dims["heads"], sa.MIN_ROWS))
            programs = dims["tokens"] * (dims["heads"] // bh) * tiles.dv_split
            steps = key_steps(mode, tiles, dims["window"], np.asarray(kw.get("n_visible", np.zeros(1, np.int32))),
                              dims["selected"])
            row = dict(tiles=spec, mode=mode, ms=1e3 * med, compile_s=compile_s, programs=programs,
                       key_steps=steps, us_per_step=1e6 * med / max(programs / sms, 1) / steps,
                       finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()), **dataclasses.asdict(tiles))
            if args.tiny:  # the jnp reference fits only small sizes
                ref = reference_attend(common["q"], common["kv"], common["ring_kv"], common["ring_pos"], common["b"],
                                       common["sinks"], scale, rope=common["rope"], norm_eps=NORM_EPS, **kw)
                row["max_abs_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            rows.append(row)
            print(f"{spec:>20} {mode:>4}: {row['ms']:9.3f} ms  {steps:6.1f} key steps  "
                  f"{row['us_per_step']:7.2f} us/step  (compile {compile_s:.1f} s)", flush=True)
    base = {r["mode"]: r["ms"] for r in rows if r["tiles"] == "default" and "ms" in r}
    for r in rows:  # against the default tiles of the same run, where it ran
        if r["mode"] in base and "ms" in r:
            r["of_default"] = r["ms"] / base[r["mode"]]
    if base:
        print("\nms / default's ms, same run:")
        for r in rows:
            if "of_default" in r:
                print(f"{r['tiles']:>20} {r['mode']:>4}: {r['of_default']:.3f}")
    res = dict(device=str(dev), sms=sms, dims=dims, results=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
