"""`python -m atom_jax.bench indexer`: the lightning indexer's top-k selection alone (scores +
selection, models/index_topk.py) for each policy, with today's policy (`loop`) as the same-run
baseline, at V4-Flash indexer dims (64 index heads x 128, top 512, CSA ratio 4).

    python -m atom_jax.bench indexer --json indexer_h200.json      # GPU: Pallas scorer, bf16 keys
    python -m atom_jax.bench indexer --tiny                        # CPU smoke run (jnp scorer)

Cases: T tokens x V visible entries (the step's longest visible prefix) in a cache of
--capacity entries per sequence (default: the largest V; 262,144 entries = a 1M-token cache).
Steps of at most --decode-max-tokens tokens are decode batches (T sequences, one token each,
every one seeing V entries); larger ones are one prefill chunk of one sequence whose last token
sees V entries (max(V, T / 4) when the chunk is longer than the context). Each sequence's page
table is its own permutation of one pool's pages. Each policy runs under `plan_topk` with the
module's budget and widths (a policy whose rungs do not fit T runs the loop), jitted once
(compile_s), then timed per call, each call synchronised (median and min of --iters); a
policy left with the loop alone is not rerun.
`same` is the share of tokens whose selection equals the loop's (the same scorer's scores,
so it should be 1.0); `same_base` the share equal to the first scorer's selection (1.0 up to
near-ties that rounding swaps).

--scorer, a comma list, each timed in the same run (`x base`: the first scorer's time for the
same case and policy over this one's): pallas (the Pallas kernel as the engine runs it: each
work item's path chosen by kernels/sparse_indexer.TILES.heads_max), pallas-tiles (every item
with tokens as the dots' rows: the kernel before the decode path), pallas-heads (every item
with all heads in one dot per token), pallas-prefill (the Pallas kernel with
kernels/sparse_indexer.PREFILL_TILES, the engine's tiles for long steps once
PREFILL_MIN_TOKENS is set; --block-e etc. do not apply to it; pallas-prefill:e128:w4 those
tiles with block_e 128, 4 warps, either), jnp, none (precomputed random
scores, relu: many exact-zero ties; the selection alone); auto: pallas-tiles,pallas-heads on
GPUs, jnp on CPU (the kernel interpreted on CPU measures nothing; pallas scorers run
interpreted there, as a check only).

    python -m atom_jax.bench indexer --tokens 1,64 --scorer pallas-tiles,pallas-heads,pallas

Prefill: "rowselect" (no sort; `auto` above 512 tokens) against the loop, the scorer and the
selection together (pallas; pallas-prefill with the candidate prefill tiles) and the selection
alone (none); --row-select jnp times rowselect (and select) with XLA's radix_select instead of
the Pallas selection:

    python -m atom_jax.bench indexer --tokens 8192 --visible 8192,32768,131072 \\
        --scorer pallas,pallas-prefill,none --policies rowselect --json indexer_prefill.json"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.timing import median_time
from atom_jax.config import v4_flash
from atom_jax.models import index_topk as it

PAGE_TOKENS = 256
SCORERS = ("pallas", "pallas-tiles", "pallas-heads", "pallas-prefill", "jnp", "none")


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("indexer", help="the indexer's top-k selection alone: each policy vs today's loop "
                               "over tokens x visible entries (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="T per step, comma list (default 1,8,64,512,8192; --tiny 1,8,96)")
    ap.add_argument("--visible", default=None, help="visible entries, comma list (default 1024,16384,65536,262144; "
                    "--tiny 256,2048)")
    ap.add_argument("--capacity", type=int, default=None, help="entries per sequence's page table (default: the "
                    "largest --visible)")
    ap.add_argument("--policies", default=",".join(it.POLICIES), help="policies to time; loop (the baseline) is "
                    "always run first")
    ap.add_argument("--scorer", default="auto", help=f"comma list of {', '.join(SCORERS)} (see above)")
    ap.add_argument("--decode-max-tokens", type=int, default=64)
    ap.add_argument("--block-t", type=int, default=None, help="the Pallas scorer's tokens per program (default "
                    "kernels/sparse_indexer.TILES: 32; 16 wastes fewer dot rows on decode batches)")
    ap.add_argument("--block-e", type=int, default=None, help="the Pallas scorer's entries per program (default "
                    "kernels/sparse_indexer.TILES: 128)")
    ap.add_argument("--num-warps", type=int, default=None, help="the Pallas scorer's warps per program")
    ap.add_argument("--heads-as", choices=("cols", "rows"), default=None, help="the heads path's dot: heads as "
                    "its columns ([block_e, di] x [di, H], default) or its rows ([H, di] x [di, block_e])")
    ap.add_argument("--heads-max", type=int, default=None, help="scorer pallas: work items of at most this many "
                    "tokens take the heads path (default kernels/sparse_indexer.TILES: 32, every item)")
    ap.add_argument("--score-budget", type=int, default=None, help="override index_topk.SCORE_BUDGET (floats)")
    ap.add_argument("--rung-min", type=int, default=None, help="override index_topk.RUNG_MIN (entries)")
    ap.add_argument("--sub-block", type=int, default=None, help="override index_topk.SUB_BLOCK (two-stage)")
    ap.add_argument("--row-rung-ratio", type=int, default=None, help="override index_topk.ROW_RUNG_RATIO "
                    "(rowselect's widths)")
    ap.add_argument("--select-block-w", type=int, default=None, help="override kernels/topk_select.BLOCK_W "
                    "(entries per tile of the Pallas selection, a power of two)")
    ap.add_argument("--select-compact-w", type=int, default=None, help="override kernels/topk_select.COMPACT_W "
                    "(entries per tile of the Pallas selection's compaction pass, a power of two; 0: BLOCK_W)")
    ap.add_argument("--select-warps", type=int, default=None, help="override kernels/topk_select.NUM_WARPS")
    ap.add_argument("--select-digit-bits", type=int, default=None, help="override kernels/topk_select.DIGIT_BITS "
                    "(1, 2, 4 or 8 bits per counting pass)")
    ap.add_argument("--select-no-prune", action="store_true", help="kernels/topk_select.PRUNE off: the Pallas "
                    "selection's radix passes over whole rows instead of the entries above the groups' bound")
    ap.add_argument("--row-select", choices=("auto", "pallas", "jnp"), default="auto", help="the selection of "
                    "select and rowselect: the Pallas kernel (kernels/topk_select.py, as the engine runs it) or the "
                    "jnp radix_select; auto: pallas on GPUs, jnp on CPU")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (float32 keys, the jnp scorer)")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _step(t: int, visible: int, decode_max: int):
    """The packed batch arrays of one step and its number of sequences."""
    from atom_jax.cache import pack_chunks

    ratio = v4_flash(1).csa_ratio
    if t <= decode_max:
        chunks = [(s, visible * ratio - 1, np.zeros(1, np.int32), True) for s in range(t)]
    else:
        start = max(0, visible * ratio - t)
        chunks = [(0, start, np.zeros(t, np.int32), True)]
    b = pack_chunks(chunks, t, len(chunks))
    return {k: jnp.asarray(v) for k, v in b.arrays().items()}, len(chunks)


def _case(rng, t, visible, capacity, dtype, decode_max, random_scores: bool):
    cfg = v4_flash(1)
    epp = PAGE_TOKENS // cfg.csa_ratio
    pages = -(-capacity // epp)
    b, slots = _step(t, visible, decode_max)
    page_table = jnp.asarray(np.stack([rng.permutation(pages) for _ in range(slots)]), jnp.int32)
    pool = jnp.asarray(rng.standard_normal((pages * epp, cfg.index_head_dim)), dtype)
    q = jnp.asarray(rng.standard_normal((t, cfg.index_n_heads, cfg.index_head_dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((t, cfg.index_n_heads)) / cfg.index_n_heads, jnp.float32)
    n_vis = jnp.where(b["valid"], (b["pos"] + 1) // cfg.csa_ratio, 0).astype(jnp.int32)
    a = dict(q=q, w=w, pool=pool, page_table=page_table, b=b, n_vis=n_vis)
    if random_scores:  # scorer none; wide enough for a loop block read at any e0 < capacity
        width = -(-capacity // 128) * 128 + it.MAX_OUTER_BLOCK
        a["scores"] = jax.nn.relu(jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (t, width)))
    return a, epp, slots


def _selector(policy, t, capacity, k, epp, slots, scorer, tiles, row_select="jnp"):
    import functools

    from atom_jax.kernels import sparse_indexer, topk_select
    from atom_jax.models.cache_reads import jnp_index_scorer

    if scorer.startswith("pallas-prefill"):
        tiles, scorer = prefill_variant(scorer), "pallas"
    plan = it.plan_topk(t, capacity, k, policy, align=tiles.block_e)
    path = scorer.split("-")[1] if "-" in scorer else "auto"

    def select(a):
        def make(width, rows=None):
            if scorer == "none":
                if rows is None:
                    return lambda e0: jax.lax.dynamic_slice_in_dim(a["scores"], e0, width, axis=1)
                s = jnp.pad(a["scores"], ((0, rows), (0, 0)))  # the last window's rows past T
                return lambda e0, r0: jax.lax.dynamic_slice(s, (r0, e0), (rows, width))
            if scorer == "jnp":
                return jnp_index_scorer(a["q"], a["w"], a["pool"], a["page_table"], a["b"]["slot"], epp, width, rows)
            return sparse_indexer.scorer(a["q"], a["w"], a["pool"], a["page_table"], a["b"], a["n_vis"], epp, width,
                                         slots, tiles=tiles, path=path, interpret=jax.default_backend() == "cpu",
                                         rows=rows)
        select = None
        if row_select == "pallas":
            select = functools.partial(topk_select.radix_select, interpret=jax.default_backend() == "cpu")
        return it.index_topk(make, a["n_vis"], k, plan, select=select)

    return jax.jit(select), plan


_VARIANT_FIELDS = {"e": "block_e", "w": "num_warps"}


def prefill_variant(scorer: str):
    """`pallas-prefill` -> sparse_indexer.PREFILL_TILES; `pallas-prefill:e128:w4` -> those tiles
    with block_e 128, 4 warps (either); SystemExit when malformed."""
    from atom_jax.kernels import sparse_indexer

    name, *fields = scorer.split(":")
    try:
        if name != "pallas-prefill":
            raise ValueError
        given = {_VARIANT_FIELDS[f[0]]: int(f[1:]) for f in fields}
        return sparse_indexer.tiles_for("auto", dataclasses.replace(sparse_indexer.PREFILL_TILES, **given))
    except (KeyError, ValueError, IndexError):
        raise SystemExit(f"--scorer {scorer!r}: pallas-prefill[:e<block_e>][:w<warps>]") from None


def _same(a, b) -> float:
    (ai, aok), (bi, bok) = [(np.asarray(i), np.asarray(o)) for i, o in (a, b)]
    rows = [set(ai[r][aok[r]].tolist()) == set(bi[r][bok[r]].tolist()) for r in range(ai.shape[0])]
    return float(np.mean(rows))


def run_cli(args) -> int:
    from atom_jax.kernels import sparse_indexer

    tiny = args.tiny
    from atom_jax.kernels import topk_select

    for mod, name, value in ((it, "SCORE_BUDGET", args.score_budget), (it, "RUNG_MIN", args.rung_min),
                             (it, "SUB_BLOCK", args.sub_block), (it, "ROW_RUNG_RATIO", args.row_rung_ratio),
                             (topk_select, "BLOCK_W", args.select_block_w),
                             (topk_select, "COMPACT_W", args.select_compact_w),
                             (topk_select, "NUM_WARPS", args.select_warps),
                             (topk_select, "DIGIT_BITS", args.select_digit_bits),
                             (topk_select, "PRUNE", False if args.select_no_prune else None)):
        if value is not None:
            setattr(mod, name, value)  # this process only: the JSON records the values used
    tiles = sparse_indexer.TILES
    for field, value in (("block_t", args.block_t), ("block_e", args.block_e), ("num_warps", args.num_warps),
                         ("heads_max", args.heads_max), ("heads_as", args.heads_as)):
        if value is not None:
            tiles = dataclasses.replace(tiles, **{field: value})
    tokens = _ints(args.tokens or ("1,8,96" if tiny else "1,8,64,512,8192"))
    visible = _ints(args.visible or ("256,2048" if tiny else "1024,16384,65536,262144"))
    capacity = args.capacity or max(visible)
    if max(visible) > capacity:
        raise SystemExit(f"--visible {max(visible)} exceeds --capacity {capacity}")
    policies = list(dict.fromkeys(["loop", *args.policies.split(",")]))
    for p in policies:
        it.plan_topk(1, capacity, 1, p)  # unknown names fail here, before any work
    auto = "jnp" if jax.default_backend() == "cpu" else "pallas-tiles,pallas-heads"
    scorers = list(dict.fromkeys(args.scorer.replace("auto", auto).split(",")))
    variants = [sc for sc in scorers if sc.startswith("pallas-prefill:")]
    if unknown := sorted(set(scorers) - set(SCORERS) - set(variants)):
        raise SystemExit(f"unknown --scorer {unknown}; known: auto, {', '.join(SCORERS)}")
    for sc in variants:
        prefill_variant(sc)  # malformed variants fail here, before any work
    dtype = jnp.float32 if tiny or jax.default_backend() == "cpu" else jnp.bfloat16
    row_select = args.row_select if args.row_select != "auto" else ("jnp" if jax.default_backend() == "cpu"
                                                                    else "pallas")
    k = min(v4_flash(1).index_topk, capacity)
    device = jax.devices()[0].device_kind
    print(f"device {device}, scorers {scorers}, keys {jnp.dtype(dtype).name}, capacity {capacity} entries, k {k}; "
          f"budget {it.SCORE_BUDGET} scores, rungs from {it.RUNG_MIN} x{it.RUNG_RATIO} (rowselect "
          f"x{it.ROW_RUNG_RATIO}, {row_select} selection), sub-block {it.SUB_BLOCK}; {tiles}; pallas-prefill "
          f"{sparse_indexer.PREFILL_TILES}", flush=True)
    rng = np.random.default_rng(0)
    results = []
    for t in tokens:
        for v in visible:
            a, epp, slots = _case(rng, t, v, capacity, dtype, args.decode_max_tokens, "none" in scorers)
            longest = int(jnp.max(a["n_vis"]))
            first = {}  # policy -> the first scorer's (selection, seconds)
            for scorer in scorers:
                base = None
                for policy in policies:
                    row = {"tokens": t, "visible": longest, "scorer": scorer, "policy": policy}
                    try:
                        fn, plan = _selector(policy, t, capacity, k, epp, slots, scorer, tiles, row_select)
                        row.update(plan=plan.method, rungs=list(plan.rungs), loop_block=plan.loop_block,
                                   row_chunks=list(plan.row_chunks))
                        if policy != "loop" and plan.method == "loop":  # no rung fits T: the baseline itself
                            continue
                        t0 = time.perf_counter()
                        out = jax.block_until_ready(fn(a))
                        row["compile_s"] = round(time.perf_counter() - t0, 2)
                        med, best = median_time(fn, [a], iters=args.iters)
                    except Exception as e:  # noqa: BLE001 (out of memory is a result here)
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        results.append(row)
                        print(json.dumps(row), flush=True)
                        continue
                    base = (out, med) if policy == "loop" else base
                    first.setdefault(policy, (out, med))
                    row.update(ms=round(med * 1e3, 4), min_ms=round(best * 1e3, 4),
                               vs_base=round(first[policy][1] / med, 3), same_base=_same(out, first[policy][0]))
                    if base is not None:
                        row.update(vs_loop=round(base[1] / med, 3), same=_same(out, base[0]))
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'T':>5} {'visible':>8} {'scorer':12} {'policy':10} {'plan':10} {'ms':>9} {'min ms':>9} {'x loop':>7} "
          f"{'x base':>7} {'same':>5} {'same base':>9} {'compile s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['tokens']:5d} {r['visible']:8d} {r['scorer']:12} {r['policy']:10} failed: {r['error'][:80]}")
            continue
        print(f"{r['tokens']:5d} {r['visible']:8d} {r['scorer']:12} {r['policy']:10} {r['plan']:10} {r['ms']:9.3f} "
              f"{r['min_ms']:9.3f} {r.get('vs_loop', float('nan')):7.2f} {r['vs_base']:7.2f} "
              f"{r.get('same', float('nan')):5.2f} {r['same_base']:9.2f} {r['compile_s']:9.2f}")
    if args.json:
        cfg = v4_flash(1)
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "scorers": scorers, "keys": jnp.dtype(dtype).name,
                       "capacity": capacity, "k": k, "index_heads": cfg.index_n_heads,
                       "index_head_dim": cfg.index_head_dim, "score_budget": it.SCORE_BUDGET,
                       "rung_min": it.RUNG_MIN, "rung_ratio": it.RUNG_RATIO, "sub_block": it.SUB_BLOCK,
                       "row_rung_ratio": it.ROW_RUNG_RATIO, "row_select": row_select,
                       "select_block_w": topk_select.BLOCK_W, "select_compact_w": topk_select.COMPACT_W, "select_warps": topk_select.NUM_WARPS,
                       "select_digit_bits": topk_select.DIGIT_BITS, "select_prune": topk_select.PRUNE,
                       "auto": {"policy": it.AUTO_POLICY, "max_tokens": it.AUTO_MAX_TOKENS,
                                "large_policy": it.AUTO_LARGE_POLICY},
                       "tiles": dataclasses.asdict(tiles), "block_t": tiles.block_t,
                       "prefill_tiles": dataclasses.asdict(sparse_indexer.PREFILL_TILES),
                       "results": results}, f, indent=1)
    return 0
