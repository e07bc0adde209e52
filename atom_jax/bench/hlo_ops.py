"""`python -m atom_jax.bench hlo-ops`: what the engine's decode step program holds, per layer.

    python -m atom_jax.bench hlo-ops --preset v4-flash --layers 4 --bucket 64            # CPU, lowered for CUDA
    python -m atom_jax.bench hlo-ops --preset tiny --bucket 8 --json /tmp/ops.json
    python -m atom_jax.bench hlo-ops --preset v4-flash --layers 4 --bucket 1 --dp 2 --weights native --compiled  # GPU
    python -m atom_jax.bench hlo-ops --preset v4-flash --layers 4 --bucket 8192 --slots 2 --dp 1 \
        --context 1048576 --page-tokens 256 --attn-backend pallas --views bytes --case-branch 3 --visible 131072
        # an 8K prefill chunk with a 1M cache (bench long-context's engine): bytes and FLOPs

Builds the program the engine compiles for one (bucket, tbo) step (`runner.device_step_program`:
input unpacking, page-table writes, the DP cached step over every layer, sampling) from
abstract shapes only (nothing is allocated, so V4-Flash dims work on a laptop), traces it for
the target platform (`--platform`: on a CPU machine `cuda` by default, so the Pallas kernels
appear as the GPU would run them) and prints, per decoder layer (`layer<i>` scopes) and for
the rest of the step:
- jaxpr equations by primitive (`--views jaxpr`);
- StableHLO ops by kind: the ones that become separate GPU kernels by name (custom calls =
  Pallas kernels, sorts, scatters, gathers, reductions, dots, collectives, loops), elementwise
  ops (XLA fuses them) lumped (`--views stablehlo`);
- with `--compiled` (this process's backend only, e.g. on the GPU machine): the launches of
  the compiled module, fusions by kind, while bodies times their trip count
  (atom_jax/trace/op_counts.py), and the literals of at least 1 MiB it embeds (what XLA's
  constant folding made, with the op they came from);
- bytes and FLOPs per layer and op family, before fusion (`--views bytes`,
  trace/op_bytes.py: loops times their trip count, the indexer's rung switch as the branch
  `--case-branch` (default the widest; rungs 4K x 2^i entries for "rowselect": 3 = 32K, a
  128K-token context), grouped GEMM and indexer kernels' FLOPs from their shapes) and the
  `--top` largest single movers with their source line;
- what makes the host wait for the device while the step is launched (`--views sync`,
  trace/host_sync.py): while loops of unknown trip count, conditionals, host callbacks outside
  kernels, with their layer and source line (the decode step should have none: issue 27);
- the seconds spent tracing, lowering (and compiling) the program: the cold-start cost of one
  bucket (`--trace-layers-once off`: every layer traced anew, for comparison).
"""

from __future__ import annotations

import argparse
import os
import sys

from atom_jax.weights.formats import LAYOUT_CHOICES, MODEL_FORMATS, resolve_layout

PRESETS = ("tiny", "v4-flash", "v4-pro")
LARGE_CONSTANT_BYTES = 1 << 20  # --compiled lists literals of the compiled module at least this big
VIEWS = ("jaxpr", "stablehlo", "bytes", "sync")


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("hlo-ops", help="op counts per layer of the engine's decode step program "
                               "(jaxpr, StableHLO, compiled launches)", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="v4-flash")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4; tiny: its own 4)")
    ap.add_argument("--bucket", type=int, default=64, help="tokens per rank of the step (a decode bucket)")
    ap.add_argument("--slots", type=int, default=None, help="sequence slots per rank (default: the bucket)")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--context", type=int, default=9216, help="max tokens per sequence (the page-table width)")
    ap.add_argument("--page-tokens", type=int, default=128)
    ap.add_argument("--weights", choices=MODEL_FORMATS, default="bf16")
    ap.add_argument("--expert-layout", choices=LAYOUT_CHOICES, default="auto",
                    help="routed experts' layout (auto: the engine's on the lowered-for platform and --weights)")
    ap.add_argument("--tbo", action="store_true", help="the two-chain (TBO) program")
    ap.add_argument("--prefix-caching", choices=("on", "off"), default="on")
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--trace-layers-once", choices=("on", "off"), default="on",
                    help="trace each layer kind once (StepOptions.trace_layers_once; off: every layer anew)")
    ap.add_argument("--platform", default=None,
                    help="lower for this platform (cuda, rocm, cpu); default: this backend, cuda on a CPU machine")
    ap.add_argument("--views", default="jaxpr,stablehlo,sync", help=f"comma list of {VIEWS}")
    ap.add_argument("--case-branch", type=int, default=None,
                    help="--views bytes: the branch of a computed switch counted (default the last)")
    ap.add_argument("--top", type=int, default=30, help="--views bytes: list this many largest movers")
    ap.add_argument("--visible", type=int, default=None, help="--views bytes: the tokens of context the sparse "
                    "attention kernels' FLOPs are counted at (default: --context)")
    ap.add_argument("--compiled", action="store_true", help="also compile (this backend) and count launches")
    ap.add_argument("--detail", default=None, metavar="SCOPE",
                    help="with --compiled: list every launch of this scope (layer<i> or step) with its op_name")
    ap.add_argument("--json", default=None)
    ap.set_defaults(func=run_cli)
    return ap


def _config(preset: str, layers):
    """The preset's config at `layers` layers (default 4; tiny has its own 4)."""
    from atom_jax.config import PRESETS

    if preset == "tiny":
        if layers not in (None, 4):
            raise SystemExit("--layers: the tiny preset has 4 layers")
        return PRESETS["tiny"]()
    return PRESETS[preset](num_layers=layers or 4)


def decode_program(cfg, *, dtype=None, weights: str = "bf16", dp: int = 2, bucket: int = 64, slots=None,
                   context: int = 9216, page_tokens: int = 128, prefix_caching: bool = True, tbo: bool = False,
                   moe_backend: str = "auto", attn_backend: str = "auto", trace_layers_once: bool = True,
                   expert_layout: str = "nmajor"):
    """-> (fn, args, kwargs): the engine's jitted step program and abstract arguments for one
    (bucket, tbo) step; `fn.trace(*args, **kwargs)` traces it without allocating anything."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from atom_jax.cache import CacheLayout, init_cache
    from atom_jax.scheduler.pages import default_state_pages
    from atom_jax.engine.runner import device_step_program, input_block_len, max_samples
    from atom_jax.loader import abstract_model
    from atom_jax.sharding import DP, StepOptions, make_dp_mesh, param_specs

    dtype = dtype or jnp.bfloat16
    slots = slots or bucket
    per_seq = -(-context // page_tokens)
    num_pages = slots * per_seq + 1
    layout = CacheLayout(slots, num_pages, page_tokens, per_seq,
                         state_pages=default_state_pages(slots, num_pages) if prefix_caching else 0)
    layout.check(cfg)
    model = abstract_model(cfg, dtype, weights=weights, expert_layout=expert_layout)
    mesh = make_dp_mesh(dp)
    opts = StepOptions(moe_backend=moe_backend, attn_backend=attn_backend, trace_layers_once=trace_layers_once)
    fn = device_step_program(model, mesh, layout, opts)

    def sds(shape, dt, spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    pure = nnx.split(model)[1].to_pure_dict()
    specs = param_specs(pure, opts.expert_mode, model.expert_layout)
    params = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), pure, specs)
    one = jax.eval_shape(lambda: init_cache(cfg, layout, dtype))
    cache = jax.tree.map(lambda a: sds((dp,) + a.shape, a.dtype, P(DP)), one)
    page_table = sds((dp, slots, per_seq), jnp.int32, P(DP))
    last_out = sds((2, max_samples(layout, dp)), jnp.int32, P())
    block = sds((input_block_len(layout, dp, bucket, tbo),), jnp.int32, P())
    return fn, (params, cache, page_table, last_out, block), {"tbo": tbo}


def kernel_flops_of(cfg, context: int | None = None):
    """kernel_flops for trace/op_bytes.census_ops: grouped GEMMs from their shapes, the indexer's
    scores [R, W] as R x W x index heads x index head dim MACs (every entry of the width; the
    kernel skips the blocks past the visible counts), the sparse attention's [T, H x hd] output
    as QK and PV MACs over each token's keys at `context` tokens (the sliding window, plus the
    indexer's top-k on CSA or context / hca_ratio entries on HCA; 0: the kernel not counted)."""
    from atom_jax.trace.op_bytes import grouped_gemm_flops

    def flops(name, operands, results):
        if "indexer_scores" in name and results and len(results[0]) == 2:
            return 2.0 * results[0][0] * results[0][1] * cfg.index_n_heads * cfg.index_head_dim
        if "sparse_attention_" in name and context and results and len(results[0]) == 2:
            extra = {"list": min(cfg.index_topk, context // cfg.csa_ratio), "all": context // cfg.hca_ratio}
            keys = cfg.sliding_window + next((v for k, v in extra.items() if f"sparse_attention_{k}" in name), 0)
            return 4.0 * results[0][0] * results[0][1] * keys
        return grouped_gemm_flops(name, operands, results)

    return flops


def count_program(fn, args, kwargs, platform: str, views=VIEWS[:2], compiled: bool = False, case_branch=None,
                  kernel_flops=None) -> dict:
    """-> {view: {scope: Counter}} for the views asked (and "compiled", "compiled_notes"; "bytes":
    trace/op_bytes' (rows, notes))."""
    import contextlib
    import time

    import jax

    from atom_jax.kernels.platform import lowering_for
    from atom_jax.trace import op_counts
    from atom_jax.trace.hlo import large_constants

    here = jax.default_backend()
    native = platform == here or (platform in ("cuda", "rocm") and here == "gpu")
    if compiled and not native:
        raise ValueError(f"--compiled compiles for this backend ({here}), not {platform}")
    out, seconds = {}, {}
    ctx = contextlib.nullcontext() if native else lowering_for(platform)
    with ctx:
        t0 = time.perf_counter()
        traced = fn.trace(*args, **kwargs)
        seconds["trace"] = time.perf_counter() - t0
        if "jaxpr" in views:
            out["jaxpr"] = op_counts.jaxpr_counts(traced.jaxpr, platform)
        if "sync" in views:
            from atom_jax.trace.host_sync import host_sync_ops

            out["sync"] = host_sync_ops(traced.jaxpr, platform)
        if "stablehlo" in views or "bytes" in views or compiled:
            t0 = time.perf_counter()
            lowered = traced.lower() if native else traced.lower(lowering_platforms=(platform,))
            seconds["lower"] = time.perf_counter() - t0
            if "stablehlo" in views:
                out["stablehlo"] = op_counts.stablehlo_counts(lowered.compiler_ir("stablehlo"))
            if "bytes" in views:
                from atom_jax.trace import op_bytes

                pick = (lambda n: n - 1) if case_branch is None else (lambda n: min(case_branch, n - 1))
                out["bytes"] = op_bytes.census_ops(lowered.compiler_ir("stablehlo"), pick,
                                                   kernel_flops or op_bytes.grouped_gemm_flops)
            if compiled:
                t0 = time.perf_counter()
                text = lowered.compile().as_text()
                seconds["compile"] = time.perf_counter() - t0
                launches, notes = op_counts.compiled_launches(text)
                out["compiled"] = op_counts.compiled_counts_of(launches)
                out["compiled_launches"], out["compiled_notes"] = launches, notes
                out["large_constants"] = large_constants(text, LARGE_CONSTANT_BYTES)
    out["seconds"] = seconds
    return out


def _ensure_host_devices(n: int) -> None:
    """A CPU run needs `n` host devices for the dp mesh: set before jax starts."""
    flag = "--xla_force_host_platform_device_count"
    if "jax" in sys.modules or flag in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}={max(n, 8)}").strip()


def run_cli(args) -> int:
    _ensure_host_devices(args.dp)
    import dataclasses
    import json

    import jax
    import jax.numpy as jnp

    from atom_jax.trace import op_counts

    views = tuple(v for v in args.views.split(",") if v)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise SystemExit(f"--views: unknown {bad}; choose from {VIEWS}")
    here = jax.default_backend()
    platform = args.platform or ("cuda" if here == "cpu" else here)
    cfg = _config(args.preset, args.layers)
    dtype = jnp.float32 if args.preset == "tiny" else jnp.bfloat16
    layout = resolve_layout(args.expert_layout, "cpu" if platform == "cpu" else "gpu", args.weights)
    fn, a, kw = decode_program(cfg, dtype=dtype, weights=args.weights, dp=args.dp, bucket=args.bucket,
                               slots=args.slots, context=args.context, page_tokens=args.page_tokens,
                               prefix_caching=args.prefix_caching == "on", tbo=args.tbo,
                               moe_backend=args.moe_backend, attn_backend=args.attn_backend,
                               trace_layers_once=args.trace_layers_once == "on",
                               expert_layout=layout)
    res = count_program(fn, a, kw, platform, views, args.compiled, args.case_branch,
                        kernel_flops_of(cfg, args.visible or args.context))
    kinds = ", ".join(f"{i}:{k}" for i, k in enumerate(cfg.attn_kinds))
    print(f"{args.preset} x{cfg.num_layers} layers ({kinds}), dp={args.dp}, bucket {args.bucket}, "
          f"weights {args.weights} (experts {layout}), tbo={args.tbo}, lowered for {platform}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    titles = {"jaxpr": "jaxpr primitive", "stablehlo": "stablehlo kind", "compiled": "compiled launch"}
    for view in ("jaxpr", "stablehlo", "compiled"):
        if view in res:
            print()
            print(op_counts.format_table(res[view], titles[view]))
    if "sync" in res:
        from atom_jax.trace.host_sync import format_host_syncs

        print()
        print(format_host_syncs(res["sync"]))
    census = None  # per scope and family: printed, and the JSON's "bytes"
    if "bytes" in res:
        from atom_jax.trace import op_bytes

        rows, notes = res["bytes"]
        census = op_bytes.census_table(rows)
        print()
        for note in sorted(set(notes)):
            print("note:", note)
        print(op_bytes.format_census(census))
        print(f"\nthe {args.top} largest movers (scope, family, runs per step, MiB per step, result, where):")
        for r in op_bytes.top_ops(rows, args.top):
            print(f"{r.scope:7} {r.family:12} x{r.times:<3} {r.bytes * r.times / 2**20:8.0f} {r.type_text[:44]:44} "
                  f"{r.where[:160]}")
    for note in res.get("compiled_notes", []):
        print("note:", note)
    if "large_constants" in res:
        print(f"constants of at least {LARGE_CONSTANT_BYTES >> 20} MiB in the compiled module: {len(res['large_constants'])}")
        for c in res["large_constants"]:
            print(f"  {c.type_text} {c.bytes / 2**20:.1f} MiB ({c.name}) {c.op_name or ''}")
    if args.detail and "compiled_launches" in res:
        print(f"\nlaunches of {args.detail} (times per step, kind, instruction, op_name):")
        for scope, mult, kind, name, op_name in res["compiled_launches"]:
            if scope == args.detail:
                print(f"{mult:>5} {kind:<28} {name:<40} {op_name}")
    if args.json:
        doc = {"preset": args.preset, "layers": cfg.num_layers, "attn_kinds": list(cfg.attn_kinds),
               "dp": args.dp, "bucket": args.bucket, "weights": args.weights, "tbo": args.tbo,
               "platform": platform, "jax": jax.__version__, "seconds": res["seconds"],
               **{v: op_counts.to_json(res[v]) for v in ("jaxpr", "stablehlo", "compiled") if v in res}}
        if "sync" in res:
            doc["host_syncs"] = [dataclasses.asdict(o) for o in res["sync"]]
        if census is not None:
            doc["bytes"] = {s: {f: dict(zip(("bytes", "flops", "runs"), c)) for f, c in fams.items()}
                            for s, fams in census.items()}
        if "compiled_notes" in res:
            doc["compiled_notes"] = res["compiled_notes"]
            doc["compiled_launches"] = [list(x) for x in res["compiled_launches"]]
            doc["large_constants"] = [dataclasses.asdict(c) for c in res["large_constants"]]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0
