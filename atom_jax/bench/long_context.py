"""`python -m atom_jax.bench long-context`: prefill tok/s and decode ms/token of the real Engine
(dp=1, one request at a time, chunked prefill) for long prompts with a long-context cache,
beside the FLOP and byte floors of the same work, for each attention backend in one run.

    python -m atom_jax.bench long-context --layers 4 --prompts 4096,16384,131072,1048576 \\
        --cache-len 1048576 --chunk 8192 --json long_context.json      # GPU, V4-Flash dims
    python -m atom_jax.bench long-context --tiny                       # CPU smoke run
    python -m atom_jax.bench long-context --prompts 131072 --decode-tokens 16 --backends pallas \
        --trace /tmp/lc_trace --trace-steps 2   # + a profile of 2 prefill chunks near 128K (GPU)

--attention-tiles default,64x32x8 runs the kernels once per tile shape of the sparse attention
kernel (query heads per program x keys per step x warps [x stages [x prefetch 0/1 [x value-dim
blocks, AttentionTiles.dv_split [x transpose 0/1 [x head-dim pieces, dim_chunks [x prefetch_rows
0/1 [x one_window_load 0/1]]]]]]]; default: its TILES).

--trace DIR: after the timed runs, the kernels' engine prefills the longest prompt that ran once more
under jax.profiler for --trace-steps chunks just before its last one (so near its full
context), and prints where those chunks' device time goes: per decoder layer and kernel
category, and the kernels taking most of it with the source of their HLO (op_name). Not
part of the timed rows.

--expert-layout nmajor,kmajor runs the kernels once per routed-expert layout (weights.formats:
kmajor holds the bf16 experts [E, N, K], which the Pallas grouped GEMM multiplies with
`transpose_b`; the same weights, transposed between the layouts' runs; auto: the engine's
choice for bf16 experts on this platform). Each is a separate engine (per attention backend),
all in this run.

--topk-policies auto,loop runs the kernels once per indexer top-k policy (loop: the running
top-k of every step, the policy before models/index_topk.py's one-call policies; a named
policy is used at every step size, decode and prefill; auto: `single` up to 512 tokens,
`rowselect` above); the jnp path always runs the loop. --indexer-paths auto,tiles runs the
kernels once per path of the indexer's scorer kernel (kernels/sparse_indexer.py; tiles: tokens
as the dots' rows for every work item, the kernel before its decode path; heads: the heads
path, one dot of all heads per token, always; prefill: auto, with
sparse_indexer.PREFILL_TILES for steps of more than 512 tokens).

Backends: `pallas` (the sparse kernels) for every prompt; `jnp` (the reference path) for
prompts up to --reference-max-prompt, with --reference-chunk chunks (its per-token gathers and
[T, T] chunk logits do not fit 8K chunks at 1M capacity); a case that fails (out of memory)
is reported as such. Weights are random bf16 at V4-Flash layer dims (float32 tiny model with
--tiny). FLOP floor: projections, active experts (top-k + shared), compressors, the indexer
over every visible CSA entry and attention over each token's window + selected CSA + visible
HCA entries, at the measured bf16 matmul rate. Decode byte floor: active weights plus the
cache rows one token reads (window, indexer keys, selected CSA and all HCA entries), at the
measured copy bandwidth."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.timing import device_ceilings
from atom_jax.config import CSA, HCA, ModelConfig, tiny, v4_flash
from atom_jax.kernels import sparse_attention, sparse_indexer
from atom_jax.kernels.names import MOE_BACKENDS
from atom_jax.models import index_topk
from atom_jax.weights.formats import BF16, resolve_layout


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("long-context", help="long prompts with a 1M cache: prefill tok/s, decode ms/token "
                               "vs FLOP and byte floors, kernels vs reference (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", default=None, help="prompt lengths (default 4096,16384,131072 and cache-len minus decode-tokens minus 1; "
                    "--tiny: 200,1000,3000)")
    ap.add_argument("--cache-len", type=int, default=None, help="--max-model-len of the engine (default "
                    "1048576; --tiny 4096)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 8192; --tiny 256)")
    ap.add_argument("--decode-tokens", type=int, default=64,
                    help="decode steps timed per prompt (16 left a few tenths of a ms of noise at 2-3 ms per token)")
    ap.add_argument("--backends", default=None, help="attention backends to run, in order (default "
                    "pallas,jnp; --tiny: jnp, as pallas is interpreted on CPU)")
    ap.add_argument("--reference-max-prompt", type=int, default=16384)
    ap.add_argument("--reference-chunk", type=int, default=2048)
    ap.add_argument("--baseline-cache-len", type=int, default=None, help="also run the kernels with this "
                    "smaller cache for the prompts that fit it (same-run baseline: a 16K prompt with a 1M "
                    "cache vs a small one; e.g. 16448)")
    ap.add_argument("--expert-layout", default="auto", help="routed-expert layouts the kernels run with, in order "
                    "(nmajor [E, K, N], kmajor [E, N, K], auto: the engine's for bf16 experts here); each is a "
                    "separate engine, the same weights, all in this run (e.g. nmajor,kmajor)")
    ap.add_argument("--topk-policies", default="auto", help="indexer top-k policies the kernels run under, in "
                    "order (models/index_topk.py: auto, loop = the running top-k before the one-call policies, "
                    "single, two-stage, select, rowselect; a named one at every step size); each is a separate "
                    "engine, all in this run")
    ap.add_argument("--indexer-paths", default="auto", help="the indexer scorer kernel's paths the kernels run "
                    "with, in order (kernels/sparse_indexer.py: auto, tiles = before the decode path, heads, prefill "
                    "= auto with PREFILL_TILES above 512 tokens); each is a separate engine, all in this run")
    ap.add_argument("--attention-tiles", default="default", help="the sparse attention kernel's tiles the kernels "
                    "run with, in order: 'default' (kernels/sparse_attention.TILES) or HxKxW[xS[xP[xD[xT[xC[xR[xO[xF[xB[xE[xL]]]]]]]]]]] = "
                    "query heads per program x keys per step x warps (x pipeline stages x prefetch 0/1 x value-dim "
                    "blocks x transpose 0/1 x head-dim pieces x prefetch_rows 0/1 x one_window_load 0/1 x fuse_rope 0/1 x window_fast 0/1/2 x exp2 0/1 x lazy_sum 0/1: "
                    "AttentionTiles), e.g. default,64x32x8,64x64x8x1x1x2; each is a separate engine, all in "
                    "this run")
    ap.add_argument("--no-prefix-caching", action="store_true", help="engines without prefix caching (no page "
                    "state written each step)")
    ap.add_argument("--trace", default=None, metavar="DIR", help="also profile a few prefill chunks of the "
                    "longest prompt with the kernels (see above) into DIR")
    ap.add_argument("--trace-steps", type=int, default=2, help="--trace: prefill chunks profiled")
    ap.add_argument("--moe-backend", default="auto",
                    help=f"the routed experts' grouped-GEMM backends, comma list of {', '.join(MOE_BACKENDS)} "
                    "(default auto: the engine's choice); each is a separate engine, all in this run")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


# ---- floors --------------------------------------------------------------------------------
_TILE_FIELDS = ("block_h", "block_k", "num_warps", "num_stages", "prefetch", "dv_split", "transpose", "dim_chunks",
                "prefetch_rows", "one_window_load", "fuse_rope", "window_fast", "exp2",
                "lazy_sum")  # a spec's fields, in order
_TILE_FLAGS = ("prefetch", "transpose", "prefetch_rows", "one_window_load", "fuse_rope", "exp2", "lazy_sum")  # 0/1
_TILE_CHOICES = {**{f: (0, 1) for f in _TILE_FLAGS}, "window_fast": (0, 1, 2)}  # the other fields: integers >= 1


def moe_backends(spec: str) -> list[str]:
    """--moe-backend's comma list -> the backends in order, duplicates dropped (an unknown name:
    ValueError; the command exits with it before any work)."""
    names = list(dict.fromkeys(spec.split(",")))
    unknown = [n for n in names if n not in MOE_BACKENDS]
    if unknown:
        raise ValueError(f"unknown --moe-backend {', '.join(map(repr, unknown))}; known: {', '.join(MOE_BACKENDS)}")
    return names


def attention_tiles(spec: str):
    """'default' -> None (the kernel's TILES); 'HxKxW[xS[xP[xD[xT[xC[xR[xO[xF[xB[xE[xL]]]]]]]]]]]' -> AttentionTiles(
    block_h=H, block_k=K, num_warps=W, num_stages=S, prefetch=P (0/1), dv_split=D, transpose=T (0/1),
    dim_chunks=C, prefetch_rows=R (0/1), one_window_load=O (0/1), fuse_rope=F (0/1), window_fast=B (0/1/2),
    exp2=E (0/1), lazy_sum=L (0/1)), each field left out AttentionTiles' field default (the plain layout, not the
    kernel's TILES)."""
    from atom_jax.kernels.sparse_attention import AttentionTiles

    if spec == "default":
        return None
    try:
        parts = [int(x) for x in spec.split("x")]
        given = dict(zip(_TILE_FIELDS, parts))
        if not 3 <= len(parts) <= len(_TILE_FIELDS) or \
                any(v not in _TILE_CHOICES[f] if f in _TILE_CHOICES else v < 1 for f, v in given.items()):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--attention-tiles: {spec!r} is not 'default' or HxKxW[xS[xP[xD[xT[xC[xR[xO[xF[xB[xE[xL]]]]]]]]]]] (e.g. "
                         "64x32x8, 64x32x8x2x0, 64x64x8x1x1x2, 64x128x8x1x0x1x1x4x1x0x1)") from None
    return AttentionTiles(**{f: bool(v) if f in _TILE_FLAGS else v for f, v in given.items()})


def _visible(ratio: int, positions: np.ndarray) -> np.ndarray:
    return (positions + 1) // ratio


def prompt_flops(cfg: ModelConfig, length: int, start: int = 0) -> float:
    """FLOPs (2 x MACs) of prefilling positions [start, start + length)."""
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    p = np.arange(start, start + length, dtype=np.float64)
    proj = d * cfg.q_lora_rank + cfg.q_lora_rank * h * hd + d * hd + h * hd * cfg.o_lora_rank + \
        cfg.o_groups * cfg.o_lora_rank * d
    moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    macs = 0.0
    for kind in cfg.attn_kinds:
        keys = np.minimum(p + 1, cfg.sliding_window)
        extra = 0.0
        if kind == CSA:
            n = _visible(cfg.csa_ratio, p)
            keys = keys + np.minimum(n, cfg.index_topk)
            extra = cfg.index_n_heads * cfg.index_head_dim * n.sum()  # indexer dots
            extra += length * (cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + d * cfg.index_n_heads)
            extra += length * 2 * d * 2 * (hd + cfg.index_head_dim)  # both compressors' (kv, gate)
        elif kind == HCA:
            keys = keys + _visible(cfg.hca_ratio, p)
            extra = length * 2 * d * hd
        macs += length * (proj + moe) + 2 * h * hd * keys.sum() + extra
    return 2.0 * macs


def active_weight_bytes(cfg: ModelConfig, total_param_bytes: int, itemsize: int) -> float:
    """Weights one decode token must read: all but the routed experts it does not use."""
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize
    unused = cfg.num_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return total_param_bytes - unused


def decode_cache_bytes(cfg: ModelConfig, context: int, itemsize: int) -> float:
    """Cache rows one decode token at `context` reads, all layers."""
    rows = 0.0
    for kind in cfg.attn_kinds:
        rows += min(context, cfg.sliding_window) * cfg.head_dim
        if kind == CSA:
            n = context // cfg.csa_ratio
            rows += n * cfg.index_head_dim + min(n, cfg.index_topk) * cfg.head_dim
        elif kind == HCA:
            rows += context // cfg.hca_ratio * cfg.head_dim
    return rows * itemsize


# ---- measurement ---------------------------------------------------------------------------
def _engine(model, dtype, backend, cache_len, chunk, prompts, page_tokens, prefix_caching=True, moe_backend="auto"):
    from atom_jax.engine import Engine, EngineConfig

    buckets = tuple(sorted({16, chunk} | {min(p, chunk) for p in prompts}))
    ec = EngineConfig(dtype=str(jnp.dtype(dtype)), num_slots=2, page_tokens=page_tokens,
                      num_pages=-(-cache_len // page_tokens) + 1, max_model_len=cache_len,
                      max_tokens_per_step=chunk, chunk_size=chunk, buckets=buckets, tbo=False,
                      attn_backend=backend, moe_backend=moe_backend, compilation_cache_dir=None,
                      enable_prefix_caching=prefix_caching)
    engine = Engine(ec, model=model, tokenizer=None)
    t0 = time.perf_counter()
    engine.warmup()
    return engine, time.perf_counter() - t0


def _run_prompt(engine, vocab: int, length: int, decode_tokens: int, rng):
    """-> (prefill s, median decode gap s, prefill detail): the detail has `add_ms` (add_request:
    validation, the prefix cache's lookup), `steps_ms` (each engine.step until the first token;
    with the overlap schedule a step returns once the previous one's tokens are read, so these
    are the chunks' cadence) and `host` (the engine clock's ms per step by phase over the prefill)."""
    from atom_jax.engine import SamplingParams

    prompt = list(map(int, rng.integers(2, vocab, length)))
    engine.host_times(reset=True)
    t0 = time.perf_counter()
    engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True))
    t_add = time.perf_counter()
    stamps, steps, host = [], [t_add], None
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids:
                stamps.append(time.perf_counter())
        if not stamps:
            steps.append(time.perf_counter())
        elif host is None:  # the prefill's steps only (the first token's step included)
            host = engine.host_times()
    prefill = stamps[0] - t0
    gaps = np.diff(stamps)
    detail = {"add_ms": round(1e3 * (t_add - t0), 2),
              "steps_ms": [round(1e3 * b, 2) for b in np.diff(steps + stamps[:1])],
              "host": {k: v for k, v in host.items() if k != "cpu"}}
    return prefill, (statistics.median(gaps) if len(gaps) else float("nan")), detail


def _trace_prompt(engine, vocab: int, length: int, chunk: int, steps: int, path: str, rng) -> int:
    """Prefill a prompt of `length` tokens, profiling `steps` chunks before its last one (the
    last chunk and a decode step after them let the profiled work finish). -> chunks profiled."""
    from atom_jax.engine import SamplingParams

    chunks = -(-length // chunk)
    steps = max(1, min(steps, chunks - 1))
    first = max(0, chunks - steps - 1)
    engine.add_request(prompt_token_ids=list(map(int, rng.integers(2, vocab, length))),
                       params=SamplingParams(max_tokens=2, ignore_eos=True))
    done = 0
    while engine.has_unfinished():
        if done == first:
            engine.start_profile(path, steps)
        engine.step()
        done += 1
    engine.stop_profile()
    return steps


def trace_summary(path: str, steps: int, top: int = 60) -> dict:
    """Device time per profiled step of a trace: busy (the union of the GPU's kernels), the sum of
    kernel times per decoder layer and category, and the `top` kernels by time with their HLO
    op_name (the jax source path of the op they ran) and the layers they ran in: one kernel name
    serves every layer (`layers_label`: ``layer0-3``; ``?`` where no op was found to say)."""
    import collections

    from atom_jax.trace.categories import layers_label
    from atom_jax.trace.events import load_trace
    from atom_jax.trace.intervals import total

    trace = load_trace(path)
    events = [e for e in trace.events if "GPU" in e.device or "gpu" in e.device.lower()] or trace.events
    per_step = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
    table = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: [0.0, 0, "", set(), {}])
    for e in events:
        table[(e.placed_layer, e.category)] += e.dur_ns
        k = kernels[e.name]
        k[0] += e.dur_ns
        k[1] += 1
        k[2] = e.category
        k[3].add(e.placed_layer)
        if e.hlo is not None and e.hlo.op_name:
            k[4][e.hlo.op_name] = None
    return {"steps": steps, "busy_ms": per_step(total([(e.start_ns, e.end_ns) for e in events])),
            "sum_ms": per_step(sum(e.dur_ns for e in events)),
            "by_layer_category_ms": {f"{layer}/{cat}": per_step(ns) for (layer, cat), ns in sorted(table.items())},
            "top_kernels": [{"name": n, "ms": per_step(v[0]), "count": v[1] / steps, "category": v[2],
                             "layer": layers_label(v[3]), "op_name": _op_names(list(v[4]))}
                            for n, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]}


def _op_names(names: list[str]) -> str:
    """One kernel's op_names: the one; several that differ only in their layer scope as one with
    ``layer*``; else the first and how many more."""
    import re

    if len(names) <= 1:
        return names[0] if names else ""
    scoped = {re.sub(r"/layer\d+/", "/layer*/", n) for n in names}
    return scoped.pop() if len(scoped) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def format_trace_summary(summary: dict) -> str:
    rows = summary["by_layer_category_ms"]
    layers = sorted({k.split("/")[0] for k in rows})
    cats = sorted({k.split("/")[1] for k in rows})
    out = [f"profiled prefill chunk: device busy {summary['busy_ms']:.2f} ms, kernels' sum {summary['sum_ms']:.2f} ms "
           "(per chunk)", f"{'ms per chunk':<14}" + "".join(f"{c:>11}" for c in cats) + f"{'all':>11}"]
    for layer in layers:
        vals = [rows.get(f"{layer}/{c}", 0.0) for c in cats]
        out.append(f"{layer:<14}" + "".join(f"{v:>11.2f}" for v in vals) + f"{sum(vals):>11.2f}")
    out.append(f"top kernels: {'ms':>7} {'per chunk':>9}  {'category':<10} {'layer':<8} name | op_name")
    for k in summary["top_kernels"]:
        out.append(f"{'':<13}{k['ms']:>7.2f} {k['count']:>9.1f}  {k['category']:<10} {k['layer']:<8} "
                   f"{k['name'][:60]} | {k['op_name'][-110:]}")
    return "\n".join(out)


def run_cli(args) -> int:
    from atom_jax.loader import random_model, with_expert_layout

    cfg = tiny() if args.tiny else v4_flash(num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cache_len = args.cache_len or (4096 if args.tiny else 1 << 20)
    # "1M" by default is the longest prompt that still leaves room for the decoded tokens.
    prompts = [int(x) for x in (args.prompts or ("200,1000,3000" if args.tiny else
                                                 f"4096,16384,131072,{cache_len - args.decode_tokens - 1}")).split(",")]
    chunk = args.chunk or (256 if args.tiny else 8192)
    page_tokens = 64 if args.tiny else 256
    if max(prompts) + args.decode_tokens + 1 > cache_len:
        raise SystemExit(f"the longest prompt plus {args.decode_tokens + 1} tokens exceeds --cache-len {cache_len}")
    if args.baseline_cache_len and min(prompts) + args.decode_tokens + 1 > args.baseline_cache_len:
        raise SystemExit(f"no prompt plus {args.decode_tokens + 1} tokens fits --baseline-cache-len "
                         f"{args.baseline_cache_len}: the baseline would run nothing")
    try:  # bad names fail before any work
        layouts = list(dict.fromkeys(resolve_layout(x, jax.default_backend(), BF16)
                                     for x in args.expert_layout.split(",")))
        moes = moe_backends(args.moe_backend)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ceil = device_ceilings()
    print(f"device {jax.devices()[0].device_kind}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    model = random_model(cfg, seed=0, dtype=dtype)
    from flax import nnx

    total_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    itemsize = jnp.dtype(dtype).itemsize
    weights = active_weight_bytes(cfg, total_bytes, itemsize)
    results, traces = [], []
    runs = []  # (layout, backend, top-k policy, indexer scorer path, attention tiles, cache length, chunk, prompts)
    policies = list(dict.fromkeys(args.topk_policies.split(",")))
    for p in policies:
        index_topk.plan_topk(1, 1, 1, p)  # unknown names fail before any work
    paths = list(dict.fromkeys(args.indexer_paths.split(",")))
    for p in paths:
        if p != "prefill":
            sparse_indexer.tiles_for(p)
    atiles = list(dict.fromkeys(args.attention_tiles.split(",")))
    for a in atiles:
        attention_tiles(a)  # malformed specs fail before any work
    for layout in layouts:  # grouped by layout: the model is transposed once per layout
        for backend in dict.fromkeys((args.backends or ("jnp" if args.tiny else "pallas,jnp")).split(",")):
            reference = backend == "jnp"
            lens = [p for p in prompts if not reference or p <= args.reference_max_prompt]
            for policy in (["loop"] if reference else policies):  # the jnp path always loops
                for path, at, moe in [(p, a, m) for p, a in ([("-", "-")] if reference else
                                                             [(p, a) for p in paths for a in atiles]) for m in moes]:
                    runs.append((layout, backend, policy, path, at, moe, cache_len,
                                 min(chunk, args.reference_chunk) if reference else chunk, lens))
                    if args.baseline_cache_len and not reference:  # the same prompts that fit a small cache
                        small = [p for p in prompts if p + args.decode_tokens + 1 <= args.baseline_cache_len]
                        runs.append((layout, backend, policy, path, at, moe, args.baseline_cache_len, chunk, small))
    auto, tiles = (index_topk.AUTO_POLICY, index_topk.AUTO_LARGE_POLICY), sparse_indexer.TILES
    switch_free = index_topk.AUTO_SWITCH_FREE  # a named policy runs as named (its rung switch too)
    prefill_min = sparse_indexer.PREFILL_MIN_TOKENS
    attn_default = sparse_attention.TILES
    for layout, backend, policy, path, at, moe, c_len, b_chunk, lens in runs:
        if not lens:
            continue
        model = with_expert_layout(model, layout)  # the same model where it already holds it
        # read when the engine compiles
        index_topk.AUTO_POLICY, index_topk.AUTO_LARGE_POLICY = auto if policy == "auto" else (policy, policy)
        index_topk.AUTO_SWITCH_FREE = switch_free if policy == "auto" else None
        sparse_indexer.TILES = tiles if path in ("-", "prefill") else sparse_indexer.tiles_for(path, tiles)  # likewise
        sparse_indexer.PREFILL_MIN_TOKENS = index_topk.AUTO_MAX_TOKENS + 1 if path == "prefill" else prefill_min
        sparse_attention.TILES = (attention_tiles(at) if at != "-" else None) or attn_default  # likewise
        try:
            engine, warm_s = _engine(model, dtype, backend, c_len, b_chunk, lens, page_tokens,
                                     not args.no_prefix_caching, moe)
        except Exception as e:  # noqa: BLE001 (out of memory is a result here)
            results.append({"experts": layout, "moe": moe, "backend": backend, "topk": policy, "indexer": path, "attn_tiles": at, "cache_len": c_len,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(json.dumps(results[-1]), flush=True)
            continue
        rng = np.random.default_rng(0)
        done = []  # the prompts that ran (a failed one is not traced: its prefill may not reach a chunk)
        for n in lens:
            row = {"experts": layout, "moe": moe, "backend": backend, "topk": policy, "indexer": path, "attn_tiles": at, "prompt": n, "cache_len": c_len,
                   "chunk": b_chunk,
                   "warmup_s": round(warm_s, 1)}
            try:
                prefill_s, decode_s, detail = _run_prompt(engine, cfg.vocab_size, n, args.decode_tokens, rng)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                results.append(row)
                print(json.dumps(row), flush=True)
                continue
            flop_floor = prompt_flops(cfg, n) / (ceil["matmul_TFLOPs"] * 1e12)
            # prefill also streams every weight once per chunk
            byte_floor = -(-n // b_chunk) * total_bytes / (ceil["copy_GBps"] * 1e9)
            dec_floor = (weights + decode_cache_bytes(cfg, n, itemsize)) / (ceil["copy_GBps"] * 1e9)
            sig = lambda x: float(f"{x:.4g}")  # noqa: E731  (4 significant digits: tiny times keep their ratio)
            row.update(prefill_s=sig(prefill_s), prefill_tok_s=round(n / prefill_s, 1),
                       prefill_floor_s=sig(max(flop_floor, byte_floor)),
                       prefill_of_floor=sig(max(flop_floor, byte_floor) / prefill_s),
                       decode_ms=sig(decode_s * 1e3), decode_floor_ms=sig(dec_floor * 1e3),
                       decode_of_floor=sig(dec_floor / decode_s), prefill_detail=detail)
            results.append(row)
            done.append(n)
            print(json.dumps(row), flush=True)
        if args.trace and c_len == cache_len and done:
            import os

            tdir = os.path.join(args.trace, f"{layout}_{moe}_{backend}_{policy}_{path}_{at}_p{max(done)}".replace("-", "_"))
            steps = _trace_prompt(engine, cfg.vocab_size, max(done), b_chunk, args.trace_steps, tdir, rng)
            summary = trace_summary(tdir, steps)
            print(format_trace_summary(summary), flush=True)
            traces.append({"experts": layout, "moe": moe, "backend": backend, "topk": policy, "indexer": path, "attn_tiles": at, "prompt": max(done),
                           "trace": tdir,
                           **summary})
        del engine
        jax.clear_caches()
    (index_topk.AUTO_POLICY, index_topk.AUTO_LARGE_POLICY), sparse_indexer.TILES = auto, tiles
    index_topk.AUTO_SWITCH_FREE = switch_free
    sparse_indexer.PREFILL_MIN_TOKENS, sparse_attention.TILES = prefill_min, attn_default
    print(f"\n{'experts':7} {'moe':10} {'backend':7} {'top-k':9} {'indexer':7} {'attn tiles':10} {'cache':>8} {'prompt':>8} {'chunk':>6} {'prefill tok/s':>13} "
          f"{'of floor':>8} {'decode ms':>9} {'floor ms':>8} {'of floor':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['experts']:7} {r['moe']:10} {r['backend']:7} {r['topk']:9} {r['indexer']:7} {r['attn_tiles']:10} "
                  f"{r['cache_len']:8d} {r.get('prompt', '-'):>8} "
                  f"failed: {r['error'][:80]}")
            continue
        print(f"{r['experts']:7} {r['moe']:10} {r['backend']:7} {r['topk']:9} {r['indexer']:7} {r['attn_tiles']:10} "
              f"{r['cache_len']:8d} {r['prompt']:8d} {r['chunk']:6d} "
              f"{r['prefill_tok_s']:13.0f} {r['prefill_of_floor']:8.3f} "
              f"{r['decode_ms']:9.2f} {r['decode_floor_ms']:8.3f} {r['decode_of_floor']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil,
                       "layers": cfg.num_layers, "dtype": str(jnp.dtype(dtype)),
                       "prefix_caching": not args.no_prefix_caching, "results": results, "traces": traces},
                      f, indent=1)
    return 0

