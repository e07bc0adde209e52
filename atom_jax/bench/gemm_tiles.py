"""`python -m atom_jax.bench gemm --prefill-tiles`: the bf16 grouped-GEMM kernel's tiles at the
MoE calls of a prefill chunk as the engine makes them (V4-Flash, 8K tokens per rank, top-6),
beside a dense matmul of the same useful rows; prints the best tiles per case and a JSON.

    python -m atom_jax.bench gemm --prefill-tiles --json tiles.json     # GPU, < 2 min
    python -m atom_jax.bench gemm --prefill-tiles --tiny                # CPU smoke run

Cases (`CASES`): dp=1 (256 experts, ~192 rows per expert: where `pallas_grouped_gemm.MID_TILES`
applies) and dp=2 (128 experts per rank; each rank multiplies both ranks' gathered tokens, the
half of the choices that are its experts', ~384 rows per expert: PREFILL_TILES), each for the
up projection (hidden -> moe_inter, rows gathered from the tokens by `row_ids`, as the w1 and w3
GEMMs run) and the down projection (moe_inter -> hidden, rows in place); rows past the last
group are left unwritten (`zero_tail=False`), as in the MoE. Routing: each choice picks an
expert uniformly at random (random router weights, as `bench long-context`). TFLOP/s counts the
useful FLOPs (2 x local rows x K x N); `frac_of_dense` is against a dense bf16 matmul of the
local rows. For the up cases it also times h = SwiGLU(x w1, x w3) as the MoE computes it: two
calls (today) vs one `grouped_gemm_pair` call (each A tile loaded once for both products; "gate_up"
rows), and prints `grouped_gemm.FUSE_GATE_UP_MIN_ROWS_PER_GROUP` to set where the fused call won
(and `pallas_grouped_gemm.PAIR_TILES` where other tiles than `pair_tiles`' did best).
Candidates (`CANDIDATES`) are few so that compiles stay inside the time budget; each case's
kernels compile first, `--compile-threads` at once (1: one after another), then run one by one
(`--budget-s`: no candidate is timed past it; the rows so far are kept).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.bench.routings import uniform_sizes
from atom_jax.bench.timing import back_to_back_time
from atom_jax.kernels import pallas_grouped_gemm as pg
from atom_jax.models.layers import swiglu_clamped

TOPK = 6
HIDDEN, MOE_INTER, EXPERTS = 4096, 2048, 256  # V4-Flash


@dataclasses.dataclass(frozen=True)
class Case:
    projection: str  # "up" (rows gathered by row_ids) or "down"
    dp: int
    tokens: int = 8192  # per rank

    @property
    def groups(self) -> int:
        return EXPERTS // self.dp

    @property
    def kn(self) -> tuple[int, int]:
        return (HIDDEN, MOE_INTER) if self.projection == "up" else (MOE_INTER, HIDDEN)

    @property
    def rows_per_group(self) -> float:
        return self.tokens * TOPK / self.groups  # = mean_rows_per_expert(tokens * dp, TOPK, EXPERTS)

    @property
    def name(self) -> str:
        return f"{self.projection}_dp{self.dp}"


CASES = [Case("up", 1), Case("down", 1), Case("up", 2), Case("down", 2)]

T = pg.TileConfig
# Around today's PREFILL_TILES (first): 64-row tiles (a 192-row group takes 3 with no padding,
# vs 2 x 128 = 256 rows), 128-wide column tiles, 128-deep K steps, warps and pipeline depth.
# Tried in session 18 and dropped (docs/benchmarks.md): 256-row tiles (a 192-row group in one item,
# each weight tile loaded once: 256x128x64 at 8 warps 4 or 3 stages, 16 warps 4) 1.16-1.20x slower
# than 128x256x64, and a folded tail (a 128- and a 64-row product in one K loop) 1.09-1.16x slower.
# Each fits an H200's 227 KB of shared memory (stages x (block_m + block_n) x block_k x 2 B).
CANDIDATES = [
    T(128, 256, 64, 8, 4), T(128, 256, 64, 8, 3), T(64, 256, 64, 4, 4), T(64, 256, 64, 8, 4),
    T(64, 256, 64, 8, 3), T(64, 128, 64, 4, 4), T(64, 128, 128, 4, 3), T(64, 128, 128, 8, 4),
    T(128, 128, 64, 4, 4), T(128, 128, 64, 8, 4), T(128, 128, 128, 8, 3), T(128, 128, 128, 4, 3),
    # half tails (`TileConfig.half_tail`: a group's last tile with <= 64 rows left runs 64 rows)
    T(128, 256, 64, 8, 4, half_tail=True), T(128, 256, 64, 8, 3, half_tail=True),
    T(128, 128, 64, 8, 4, half_tail=True),
]
MAX_ERR = 2e-2  # bf16 outputs (one rounding each) of float32 sums in another order
SWIGLU_LIMIT = 10.0  # V4's swiglu_limit
# The fused gate/up kernel's alternatives to `pg.pair_tiles` (each K step multiplies the A tile
# by two [block_k, block_n] weight tiles; two float32 accumulators).
PAIR_CANDIDATES = [T(64, 128, 64, 4, 4), T(128, 128, 64, 8, 3), T(64, 128, 64, 8, 4)]
TINY_CASES = [Case("up", 1, tokens=16), Case("down", 2, tokens=16)]
TINY_SHAPE = (8, 64, 128)  # (experts, hidden, inter) of the CPU smoke run
TINY_CANDIDATES = [T(16, 64, 32, 4, 2), T(32, 128, 64, 4, 2), T(32, 128, 64, 4, 2, half_tail=True)]


def tiny_shape(case: Case) -> tuple[int, int, int]:
    """(groups, K, N) of a case in the CPU smoke run."""
    g, d, i = TINY_SHAPE
    return (g, d, i) if case.projection == "up" else (g, i, d)


def tiles_name(cfg: pg.TileConfig) -> str:
    half = " ht" if cfg.half_tail else ""
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} {cfg.num_warps}w {cfg.num_stages}s{half}"


_SPEC_FLAGS = {"ht": "half_tail"}  # a tiles spec's flag suffixes -> TileConfig fields
_SPEC_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")


def tiles_spec(tiles: dict) -> str:
    """A TileConfig (as a dict, the sweep JSON's `tiles`) as the spec the GPU scripts take:
    MxNxKxWARPSxSTAGES, then xht for a half tail (``128x256x64x8x4xht``)."""
    return "x".join(str(tiles[f]) for f in _SPEC_FIELDS) + "".join(
        f"x{short}" for short, flag in _SPEC_FLAGS.items() if tiles.get(flag))


def tiles_from_spec(spec: str) -> pg.TileConfig:
    """`tiles_spec`'s inverse; ValueError when malformed."""
    parts = spec.split("x")
    if len(parts) < len(_SPEC_FIELDS) or any(p not in _SPEC_FLAGS for p in parts[len(_SPEC_FIELDS):]):
        raise ValueError(f"tiles spec {spec!r}: MxNxKxWARPSxSTAGES[x{'|x'.join(_SPEC_FLAGS)}]")
    return pg.TileConfig(*map(int, parts[:len(_SPEC_FIELDS)]),
                         **{_SPEC_FLAGS[p]: True for p in parts[len(_SPEC_FIELDS):]})


def case_inputs(case: Case, rng, groups: int, k: int, n: int, copies: int = 2):
    """`copies` inputs of one MoE call, as `routed_experts` makes it: (a, row_ids or None, sizes).
    up: a = the gathered tokens [tokens x dp, K], row_ids [tokens x dp x TOPK] (the sorted
    choices' tokens); down: a = [tokens x dp x TOPK, K] rows in place. Each rank's experts hold
    1/dp of the choices, uniformly at random; the rest sort past the last group."""
    tokens = case.tokens * case.dp
    m = tokens * TOPK
    out = []
    for i in range(copies):
        sizes = jnp.asarray(uniform_sizes(rng, m // case.dp, groups))
        key = jax.random.key(i)
        if case.projection == "up":
            a = jax.random.normal(key, (tokens, k), jnp.bfloat16)
            ids = jnp.asarray(rng.integers(0, tokens, m), jnp.int32)
        else:
            a, ids = jax.random.normal(key, (m, k), jnp.bfloat16), None
        out.append((a, ids, sizes))
    return out


def compile_all(jobs, inputs, threads: int):
    """{key: (call(a, weights, sizes, row_ids), weights)} -> {key: the call jitted and compiled
    for inputs[0]'s shapes, or the exception compiling it raised}, compiled on `threads` threads
    at once (the sweep's time is mostly compiles: Triton and ptxas, which release the GIL)."""
    a, ids, sizes = inputs[0]

    def compile_one(job):
        call, weights = job
        try:
            return jax.jit(call).lower(a, weights, sizes, ids).compile()
        except Exception as e:  # recorded in the job's row (e.g. out of shared memory)
            return e

    if threads <= 1:
        return {key: compile_one(job) for key, job in jobs.items()}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return dict(zip(jobs, pool.map(compile_one, jobs.values())))


def time_call(f, inputs, weights, iters: int, ref=None):
    """`f(a, weights, sizes, row_ids)` (compiled; raised if an exception): (seconds per call, the
    output of inputs[0], its max error relative to `ref`'s largest entry over the rows in groups,
    or None without `ref`)."""
    if isinstance(f, Exception):
        raise f
    sec = back_to_back_time(lambda i: f(inputs[i][0], weights, inputs[i][2], inputs[i][1]), range(len(inputs)),
                            iters=iters)
    a, ids, sizes = inputs[0]
    out = f(a, weights, sizes, ids)
    return sec, out, None if ref is None else float(rel_error(out, ref, jnp.sum(sizes)))


def tiles_call(cfg):
    """One projection with tiles `cfg`, as the MoE calls it (rows past the groups unwritten)."""
    interpret = jax.default_backend() == "cpu"
    return lambda a, ws, s, ids: pg.grouped_gemm(a, ws[0], s, cfg=cfg, interpret=interpret, row_ids=ids,
                                                 zero_tail=False)


def gate_up_calls(rows_per_group: float, pair_candidates):
    """{name: (tiles, call(a, (w1, w3), sizes, row_ids))}: h = SwiGLU(a w1, a w3) as the MoE
    computes it: two calls at the seam's tiles (the up GEMM's epilogue applies the SwiGLU), and
    one `grouped_gemm_pair` call at its default tiles and at `pair_candidates`."""
    interpret = jax.default_backend() == "cpu"
    act = functools.partial(swiglu_clamped, limit=SWIGLU_LIMIT)
    single = pg.default_tiles(rows_per_group)

    def two(a, ws, s, ids):
        gate = pg.grouped_gemm(a, ws[0], s, cfg=single, interpret=interpret, row_ids=ids, zero_tail=False)
        return pg.grouped_gemm(a, ws[1], s, cfg=single, interpret=interpret, row_ids=ids, zero_tail=False,
                               epilogue=(act, gate))

    def fused(cfg):
        return lambda a, ws, s, ids: pg.grouped_gemm_pair(a, *ws, s, act, cfg=cfg, interpret=interpret, row_ids=ids,
                                                          zero_tail=False)

    pair = pg.pair_tiles(rows_per_group)
    calls = {"two_calls": (single, two), "fused": (pair, fused(pair))}
    calls.update({f"fused {tiles_name(c)}": (c, fused(c)) for c in pair_candidates if c != pair})
    return calls


@jax.jit
def rel_error(out, ref, valid):
    """max |out - ref| / max |ref| over rows [0, valid) (rows past the groups are unwritten)."""
    rows = (jnp.arange(out.shape[0]) < valid)[:, None]
    diff = jnp.where(rows, jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)), 0)
    return jnp.max(diff) / jnp.max(jnp.where(rows, jnp.abs(ref.astype(jnp.float32)), 0))


def dense_time(rows: int, k: int, n: int, iters: int) -> float:
    xs = [jax.random.normal(jax.random.key(i), (rows, k), jnp.bfloat16) for i in range(2)]
    w = jax.random.normal(jax.random.key(7), (k, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return back_to_back_time(lambda i: f(xs[i], w), [0, 1], iters=iters)


def best_rows(rows):
    """{case: its fastest row} over the rows without an error."""
    best = {}
    for r in rows:
        if "ms" in r and (r["case"] not in best or r["ms"] < best[r["case"]]["ms"]):
            best[r["case"]] = r
    return best


def best_tiles(rows) -> dict | None:
    """The tiles (as a dict) with the least total time over every case of `rows`, among those
    with a time at each; None if none has."""
    totals = {}
    for r in rows:
        if "ms" in r:
            totals.setdefault(json.dumps(r["tiles"], sort_keys=True), []).append(r["ms"])
    cases = len({r["case"] for r in rows})
    full = {key: sum(ms) for key, ms in totals.items() if len(ms) == cases}
    return json.loads(min(full, key=full.get)) if full else None


def constant_line(name: str, rows) -> str | None:
    """The constant `name` to set from `rows` (cases of one regime): `best_tiles`, as Python."""
    t = best_tiles(rows)
    if t is None:
        return None
    return (f"{name} = TileConfig(block_m={t['block_m']}, block_n={t['block_n']}, block_k={t['block_k']}, "
            f"num_warps={t['num_warps']}, num_stages={t['num_stages']}" +
            (", half_tail=True)" if t.get("half_tail") else ")"))


def gate_up_rows(out, case: Case, inputs, ws, calls, rows_per_group: float, flops: float, dense_s, iters: int):
    """The up case's h = SwiGLU(x w1, x w3) both ways into out["gate_up"]: `calls` {name: (tiles,
    compiled call)} (`gate_up_calls`, compiled), each checked against the two calls' output."""
    ref = None
    for name, (cfg, call) in calls.items():
        row = {"case": case.name, "variant": name, "rows_per_group": rows_per_group, "tiles": dataclasses.asdict(cfg)}
        try:
            sec, got, err = time_call(call, inputs, ws, iters, ref)
            ref = got if ref is None else ref
            if err is not None and not err < MAX_ERR:
                raise ArithmeticError(f"wrong: max error {err:.3g} of the largest entry vs the two calls")
            row.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12, max_err_vs_two_calls=err or 0.0)
            if dense_s:
                row["frac_of_dense"] = 2 * dense_s / sec
            print(f"{case.name:9} {rows_per_group:8.0f} gate_up {name:36} {tiles_name(cfg):22} {row['ms']:8.3f} "
                  f"{row['TFLOPs']:8.1f} {100 * row.get('frac_of_dense', 0):6.1f}", flush=True)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{case.name:9} gate_up {name} error {row['error'][:100]}", flush=True)
        out["gate_up"].append(row)


def fused_rows(rows):
    return [r for r in rows if r["variant"].startswith("fused")]


def fuse_line(rows) -> str | None:
    """grouped_gemm.FUSE_GATE_UP_MIN_ROWS_PER_GROUP to set: the fused call at its best tiles over
    the cases (`best_tiles`, what PAIR_TILES would be) against the two calls, from the least rows
    per expert from which it won at every case; None where it did not win at the largest."""
    tiles = best_tiles(fused_rows(rows))
    by_case = {}
    for r in rows:
        if "ms" in r and (r["variant"] == "two_calls" or r["tiles"] == tiles and r["variant"] != "two_calls"):
            by_case.setdefault((r["rows_per_group"], r["case"]), {})[r["variant"] == "two_calls"] = r["ms"]
    wins = [(rpg, v[False] < v[True]) for (rpg, _), v in sorted(by_case.items()) if len(v) == 2]
    for i, (rpg, _) in enumerate(wins):
        if all(w for _, w in wins[i:]):
            return f"FUSE_GATE_UP_MIN_ROWS_PER_GROUP = {int(rpg)}"
    return None


def pair_line(rows) -> str | None:
    """pallas_grouped_gemm.PAIR_TILES to set: the fused call's best tiles over the cases, where
    they are not `pair_tiles`' at some case."""
    tiles = best_tiles(fused_rows(rows))
    if tiles is None or all(dataclasses.asdict(pg.pair_tiles(r["rows_per_group"])) == tiles for r in rows):
        return None
    return constant_line("PAIR_TILES", fused_rows(rows))


def run(args) -> int:
    rng = np.random.default_rng(0)
    cases, candidates = (TINY_CASES, TINY_CANDIDATES) if args.tiny else (CASES, CANDIDATES)
    if getattr(args, "tile_cases", ""):
        wanted = args.tile_cases.split(",")
        if unknown := set(wanted) - {c.name for c in cases}:
            raise SystemExit(f"--tile-cases: unknown {sorted(unknown)}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    on_gpu = jax.default_backend() != "cpu"
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "topk": TOPK,
           "current": {"MID_TILES": dataclasses.asdict(pg.MID_TILES),
                       "PREFILL_TILES": dataclasses.asdict(pg.PREFILL_TILES),
                       "MID_MAX_ROWS_PER_GROUP": pg.MID_MAX_ROWS_PER_GROUP},
           "rows": [], "dense": {}, "gate_up": []}
    t0 = time.time()

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    print(f"# {out['device']}  candidates {len(candidates)}  cases {[c.name for c in cases]}", flush=True)
    print(f"{'case':9} {'rows/exp':>8} {'tiles':22} {'ms':>8} {'TFLOP/s':>8} {'%dense':>6}", flush=True)
    for ci, case in enumerate(cases):
        groups, k, n = tiny_shape(case) if args.tiny else (case.groups, *case.kn)
        inputs = case_inputs(case, rng, groups, k, n)
        w = jax.random.normal(jax.random.key(7), (groups, k, n), jnp.bfloat16) * 0.02
        local_rows = case.tokens * TOPK
        flops = 2.0 * local_rows * k * n
        dense_s = dense_time(local_rows, k, n, args.iters) if on_gpu else None
        out["dense"][case.name] = {"ms": dense_s and dense_s * 1e3, "TFLOPs": dense_s and flops / dense_s / 1e12}
        if dense_s:
            print(f"{case.name:9} {'':8} {'dense_matmul':22} {dense_s * 1e3:8.3f} {flops / dense_s / 1e12:8.1f}",
                  flush=True)
        jobs = {i: (tiles_call(cfg), (w,)) for i, cfg in enumerate(candidates)}
        if case.projection == "up":  # and h = SwiGLU(x w1, x w3), two calls vs fused
            ws = tuple(jax.random.normal(jax.random.key(8 + i), (groups, k, n), jnp.bfloat16) * 0.02 for i in range(2))
            pairs = gate_up_calls(local_rows / groups, [] if args.tiny else PAIR_CANDIDATES)
            jobs.update({name: (call, ws) for name, (_, call) in pairs.items()})
        t1 = time.time()
        compiled = compile_all(jobs, inputs, args.compile_threads)
        print(f"# {case.name}: {len(jobs)} compiled in {time.time() - t1:.0f} s", flush=True)
        if case.projection == "up":
            gate_up_rows(out, case, inputs, ws, {name: (cfg, compiled[name]) for name, (cfg, _) in pairs.items()},
                         local_rows / groups, 2 * flops, dense_s, args.iters)
        ref = None  # the first candidate's output (today's PREFILL_TILES): the others must agree
        share = args.budget_s * (ci + 1) / len(cases)  # each case's share of the budget, unused time carried
        for i, cfg in enumerate(candidates):
            if time.time() - t0 > share:
                print(f"# {share:.0f} s of the {args.budget_s:.0f} s budget spent: {case.name} {tiles_name(cfg)} "
                      "and later skipped", flush=True)
                break
            row = {"case": case.name, "groups": groups, "K": k, "N": n, "tokens_per_rank": case.tokens,
                   "dp": case.dp, "rows_per_group": local_rows / groups, "tiles": dataclasses.asdict(cfg)}
            try:
                sec, got, err = time_call(compiled[i], inputs, (w,), args.iters, ref)
                ref = got if ref is None else ref
                if err is not None and not err < MAX_ERR:  # a wrong kernel is not a candidate, however fast
                    raise ArithmeticError(f"wrong: max error {err:.3g} of the largest entry vs the first candidate")
                row.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12, max_err_vs_first=err or 0.0)
                if dense_s:
                    row["frac_of_dense"] = dense_s / sec
                print(f"{case.name:9} {row['rows_per_group']:8.0f} {tiles_name(cfg):22} {row['ms']:8.3f} "
                      f"{row['TFLOPs']:8.1f} {100 * row.get('frac_of_dense', 0):6.1f}", flush=True)
            except Exception as e:  # record, keep going (e.g. out of shared memory, or wrong)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{case.name:9} {'':8} {tiles_name(cfg):22} error {row['error'][:100]}", flush=True)
            out["rows"].append(row)
        save()
    out["best"] = {c: {"tiles": r["tiles"], "ms": r["ms"]} for c, r in best_rows(out["rows"]).items()}
    for c, r in out["best"].items():
        print(f"best {c}: {tiles_name(pg.TileConfig(**r['tiles']))} {r['ms']:.3f} ms", flush=True)
    # The constants to set: the least total time over the cases each regime covers.
    mid = [r for r in out["rows"] if r["rows_per_group"] < pg.MID_MAX_ROWS_PER_GROUP]
    big = [r for r in out["rows"] if r["rows_per_group"] >= pg.MID_MAX_ROWS_PER_GROUP]
    out["set"] = {name: line for name, line in (("MID_TILES", constant_line("MID_TILES", mid)),
                                                ("PREFILL_TILES", constant_line("PREFILL_TILES", big))) if line}
    for line in out["set"].values():
        print(f"set in atom_jax/kernels/pallas_grouped_gemm.py: {line}", flush=True)
    line = fuse_line(out["gate_up"])
    if line:
        out["set"]["FUSE_GATE_UP_MIN_ROWS_PER_GROUP"] = line
        print(f"set in atom_jax/kernels/grouped_gemm.py: {line}", flush=True)
        pair = pair_line(out["gate_up"])
        if pair:
            out["set"]["PAIR_TILES"] = pair
            print(f"set in atom_jax/kernels/pallas_grouped_gemm.py: {pair}", flush=True)
    out["seconds"] = time.time() - t0
    print(f"# {out['seconds']:.0f} s", flush=True)
    save()
    return 0
