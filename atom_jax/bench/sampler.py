"""`python -m atom_jax.bench sampler`: the on-device sampler (`engine.sampler.sample_tokens`, a
radix select of the top-k / top-p cuts, no vocabulary sort) against the sampler it replaced (a
full-vocabulary sort per row, `sorted_sampler` below), same inputs, same run:

    python -m atom_jax.bench sampler --batches 1,64,256 --json sampler_h200.json   # GPU, V4 vocabulary
    python -m atom_jax.bench sampler --tiny                                        # CPU smoke run

Variants of the radix select (`--variants`, RADIXxLEVELS: key bits per pass x row-sum levels,
`engine.sampler.RADIX_BITS` / `SUM_LEVELS` set while each is traced; `default` is the engine's):
4x2 = 16 passes of two reductions each, 4x1 = 16 of one, 8x1 = 8 passes of one reduction over
255 thresholds. On a GPU each reduction is about one kernel, which at batch 1 is its cost.

Per batch size and variant: ms per call (jitted, called back to back: in the engine the sampler
is part of the step program, so launch gaps are not its cost), over the sorted sampler's, and
the share of rows where both drew the same token (the two keep the same supports up to f32
rounding at the cut, and draw with the same keys, so nearly all rows agree; greedy rows always
do). Rows mix the engine's cases: greedy, temperature 0.6-1.7, top_k 0/1/50, top_p 0.9/1.0."""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.timing import back_to_back_time

V4_VOCAB = 129_280


def sorted_sampler(logits, temperature, top_k, top_p, seeds, counters):
    """The sampler before the radix select: one full-vocabulary sort per row. The bench's
    baseline and the tests' oracle for the seeded draws. -> (tokens, logprobs, support mask)."""
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
    keep_n = jnp.sum(cum - jax.nn.softmax(desc, axis=-1) < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(desc, jnp.maximum(keep_n - 1, 0)[:, None], axis=-1)
    support = (scaled >= kth) & (scaled >= pth)
    masked = jnp.where(support, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = jnp.where(temperature <= 0, greedy, drawn).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], support


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("sampler", help="the radix-select sampler vs the sorted one it replaced, per batch",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="comma list of rows per call (default 1,64,256; --tiny 1,8)")
    ap.add_argument("--vocab", type=int, default=None, help=f"default {V4_VOCAB} (V4's); --tiny 1000")
    ap.add_argument("--variants", default="default,4x1,8x1",
                    help="comma list of radix variants RADIXxLEVELS (e.g. 4x2, 4x1, 8x1) or default")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def sampler_inputs(rows: int, vocab: int, seed: int = 0):
    """Logits like a model's (a few large values over a normal bulk) and per-row parameters
    cycling through the engine's cases."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 2
    logits[np.arange(rows), rng.integers(0, vocab, rows)] += 12
    i = np.arange(rows)
    cyc = lambda values: np.asarray(values)[i % len(values)]  # noqa: E731
    return (jnp.asarray(logits), jnp.asarray(cyc([0.0, 0.6, 1.0, 1.7]), jnp.float32),
            jnp.asarray(cyc([0, 50, 1, 0, 50]), jnp.int32), jnp.asarray(cyc([1.0, 0.9, 0.9]), jnp.float32),
            jnp.asarray(rng.integers(0, 2**32, rows), jnp.uint32), jnp.asarray(rng.integers(0, 2**32, rows), jnp.uint32))


@contextlib.contextmanager
def radix_variant(spec: str):
    """engine.sampler's RADIX_BITS / SUM_LEVELS as `spec` says ('default' or BITSxLEVELS) inside
    this block. jit's trace cache does not know them, so it is cleared on the way in and out (as
    `kernels.platform.lowering_for` does): trace, compile and time a variant inside the block."""
    from atom_jax.engine import sampler

    saved = sampler.RADIX_BITS, sampler.SUM_LEVELS
    if spec != "default":
        bits, levels = (int(x) for x in spec.split("x"))
        if 32 % bits or levels not in (1, 2):
            raise SystemExit(f"--variants: {spec!r}: RADIXxLEVELS with RADIX dividing 32, LEVELS 1 or 2")
        sampler.RADIX_BITS, sampler.SUM_LEVELS = bits, levels
    jax.clear_caches()
    try:
        yield
    finally:
        sampler.RADIX_BITS, sampler.SUM_LEVELS = saved
        jax.clear_caches()


def run_cli(args) -> int:
    from atom_jax.engine.sampler import sample_tokens

    batches = [int(b) for b in (args.batches or ("1,8" if args.tiny else "1,64,256")).split(",")]
    vocab = args.vocab or (1000 if args.tiny else V4_VOCAB)
    variants = args.variants.split(",")
    sort = jax.jit(lambda *a: sorted_sampler(*a)[:2])
    rows = []
    for b in batches:
        inputs = sampler_inputs(b, vocab)
        sorted_ms = 1e3 * back_to_back_time(lambda _: sort(*inputs), iters=args.iters)
        ref_tokens = np.asarray(sort(*inputs)[0])
        print(f"rows {b:4d}: sorted {sorted_ms:8.3f} ms", flush=True)
        for spec in variants:
            with radix_variant(spec):
                radix = jax.jit(sample_tokens)
                tokens = np.asarray(radix(*inputs)[0])
                ms = 1e3 * back_to_back_time(lambda _: radix(*inputs), iters=args.iters)
            row = dict(rows=b, vocab=vocab, variant=spec, radix_ms=ms, sorted_ms=sorted_ms,
                       radix_over_sorted=ms / sorted_ms, same_token_share=float(np.mean(tokens == ref_tokens)))
            rows.append(row)
            print(f"           radix {spec:>7} {ms:8.3f} ms  / sorted {row['radix_over_sorted']:.3f}  "
                  f"same token {row['same_token_share']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), results=rows), f, indent=1)
    return 0
