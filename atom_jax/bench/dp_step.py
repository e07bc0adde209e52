"""`python -m atom_jax.bench dp-step`: the sharded DP step, TBO on vs off, at V4-Flash layer
dimensions.

    python -m atom_jax.bench dp-step --layers 6 --json out.json --hlo-dir hlo/
    python -m atom_jax.bench dp-step --layers 6 --emulate-dp 8 --json dp8.json   # one rank of dp=8 per GPU

Prefill sizes are tokens per rank made of 1024-token sequences; decode sizes are that many
one-token rows per rank (no KV cache yet: attention is trivial there, the MoE is real).
Also times the step's collectives alone (same shapes, no compute), and checks in the compiled
HLO of each TBO step which collectives overlap GEMMs, and one layer's routed experts alone at
the rank's shapes (whole step and TBO half). Prints a table and writes JSON; the JSON is the
calibration input of `bench tbo-model`. With --emulate-dp N every row is labelled "emulated
dp=N" (atom_jax/sharding/emulate.py: what the emulation is and what it leaves out)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.bench.timing import median_time
from atom_jax.config import PRESETS, tiny
from atom_jax.kernels import grouped_gemm
from atom_jax.sharding import DP, StepOptions, make_dp_mesh, make_step, random_params_on_mesh
from atom_jax.sharding.emulate import check_emulation, held_experts
from atom_jax.trace.capture import profile_steps
from atom_jax.trace.hlo import analyze_hlo
from atom_jax.weights.formats import LAYOUT_CHOICES, LAYOUT_HELP, MODEL_FORMATS, resolve_layout


def time_fn(fn, inputs, iters):
    """Median and min wall time (ms) per call after warm-up, cycling through the inputs."""
    med, best = median_time(fn, inputs, iters)
    return med * 1e3, best * 1e3


def comm_only(mesh, cfg, tokens, layers, dtype, emulate_dp=None):
    """The collectives of one non-TBO step: per layer AG(x, weights, ids) and RS(partial).
    Emulating dp=N on M devices, each device sends (N - 1) x tokens / (M - 1) rows."""
    k = cfg.num_experts_per_tok
    m = mesh.shape[DP]
    if emulate_dp:
        tokens = (emulate_dp - 1) * tokens // (m - 1)

    def body(x, w, i):
        acc = x
        for _ in range(layers):
            xg = jax.lax.all_gather(acc, DP, axis=0, tiled=True)
            wg = jax.lax.all_gather(w, DP, axis=0, tiled=True)
            ig = jax.lax.all_gather(i, DP, axis=0, tiled=True)
            part = xg * (1 + wg[:, :1].astype(dtype)) + ig[:, :1].astype(dtype)
            acc = jax.lax.psum_scatter(part, DP, scatter_dimension=0, tiled=True)
        return acc

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(DP), P(DP), P(DP)), out_specs=P(DP), check_vma=False))
    dp = m
    sh = NamedSharding(mesh, P(DP))
    x = jax.device_put(jnp.ones((dp * tokens, cfg.hidden_size), dtype), sh)
    w = jax.device_put(jnp.ones((dp * tokens, k), jnp.float32), sh)
    i = jax.device_put(jnp.ones((dp * tokens, k), jnp.int32), sh)
    return time_fn(lambda _: f(x, w, i), [0], 10)[0]


def experts_only(cfg, dp, tokens, dtype, backend, iters):
    """ms of one layer's routed experts on one rank of dp: dp x tokens gathered rows routed
    uniformly over all experts, this rank's E / dp experts computed (the rest sorted past the
    last group, as in the step)."""
    from atom_jax.models.moe import routed_experts

    e_local, k, d, i = cfg.n_routed_experts // dp, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    n = dp * tokens
    key = jax.random.key(1)
    x = jax.random.normal(key, (n, d), dtype)
    idx = jax.random.randint(jax.random.fold_in(key, 1), (n, k), 0, cfg.n_routed_experts, jnp.int32)
    w = jnp.full((n, k), 1.0 / k, jnp.float32)
    w1, w3 = (0.02 * jax.random.normal(jax.random.fold_in(key, j), (e_local, d, i), dtype) for j in (2, 3))
    w2 = 0.02 * jax.random.normal(jax.random.fold_in(key, 4), (e_local, i, d), dtype)
    # weights are arguments: closed over, they would be captured as GBs of HLO constants
    f = jax.jit(lambda x, idx, w, w1, w3, w2: routed_experts(x, idx, w, w1, w3, w2, cfg.swiglu_limit, 0, backend,
                                                                 cfg.n_routed_experts))
    ms = time_fn(lambda x: f(x, idx, w, w1, w3, w2), [x], iters)[0]
    del x, w1, w2, w3
    return ms


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("dp-step", help="sharded DP step, TBO on vs off (GPU; --tiny on CPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prefill", default="1024,4096,8192")
    ap.add_argument("--decode", default="32,128,256,512")
    ap.add_argument("--seq", type=int, default=1024, help="prefill sequence length")
    ap.add_argument("--backend", default="capacity")
    ap.add_argument("--expert-mode", default="expert")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--preset", choices=("v4-flash", "v4-pro"), default="v4-flash", help="layer dimensions")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--weights", choices=MODEL_FORMATS, default="bf16",
                    help="random weights: bf16, native (FP4 experts, FP8 projections) or fp4-experts "
                    "(FP4 experts, dense projections)")
    ap.add_argument("--expert-layout", choices=LAYOUT_CHOICES, default="auto",
                    help=f"with FP4 experts: {LAYOUT_HELP} (compare layouts with one run each)")
    ap.add_argument("--emulate-dp", type=int, default=None, metavar="N",
                    help="each device runs one rank of dp=N (rank shapes and per-rank link volume; "
                         "atom_jax/sharding/emulate.py says what it leaves out)")
    ap.add_argument("--tbo-schedule", default="split",
                    help="TBO schedules to time beside base, comma list of split (each chain its own expert "
                         "GEMM; columns 'tbo') and fused (one expert GEMM over both chains: weights read once; "
                         "columns 'fused'); see atom_jax/sharding/overlap.py")
    ap.add_argument("--no-components", action="store_true",
                    help="skip timing one layer's routed experts alone (the step model's calibration)")
    ap.add_argument("--compile-workers", type=int, default=8, help="XLA compiles run at once (threads)")
    ap.add_argument("--json")
    ap.add_argument("--hlo-dir")
    ap.add_argument("--profile", metavar="DIR", help="jax.profiler trace of 3 steps of the largest case "
                    "(DIR/base, DIR/tbo; read with python -m atom_jax.trace report)")
    ap.set_defaults(func=run_cli)
    return ap


def run_cli(args) -> int:

    mesh = make_dp_mesh()
    dp = mesh.shape[DP]
    cfg = tiny() if args.tiny else PRESETS[args.preset](num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    base = StepOptions(expert_mode=args.expert_mode, moe_backend=args.backend, output="hidden")
    # --emulate-dp equal to the device count still runs the emulation code (no stand-in ranks):
    # beside the plain run it measures what the emulation itself costs
    emulate = args.emulate_dp or None
    rank_dp = emulate or dp  # the dp whose rank each device runs
    label = f"emulated dp={emulate}" if emulate else f"dp={dp}"
    if emulate:
        check_emulation(cfg.n_routed_experts, dp, emulate, args.expert_mode)
    model, params = random_params_on_mesh(
        cfg, mesh, base, dtype, weights=args.weights,
        experts=held_experts(cfg.n_routed_experts, dp, emulate) if emulate else None,
        expert_layout=resolve_layout(args.expert_layout, jax.default_backend(), args.weights))
    print(f"{label}: devices {dp} x {jax.devices()[0].device_kind}; layers {cfg.num_layers} {cfg.attn_kinds}; "
          f"weights {args.weights} (experts {model.expert_layout}); "
          f"backend {args.backend}; capacity factor {grouped_gemm.CAPACITY_FACTOR}", flush=True)

    schedules = args.tbo_schedule.split(",")
    # "tbo" = the split schedule (the step's default); "fused" = one expert GEMM for both chains
    variants = [("base", False, "split")] + [("tbo" if s == "split" else s, True, s) for s in schedules]
    cases = [("prefill", int(t), args.seq) for t in args.prefill.split(",") if t.strip()] + \
            [("decode", int(t), 1) for t in args.decode.split(",") if t.strip()]
    largest = max(cases, key=lambda c: c[1])  # prefill first on a tie
    rng = np.random.default_rng(0)
    rows_out = []
    case_inputs = {}
    for phase, tokens, seq in cases:
        rows = max(1, tokens // seq)
        case_inputs[(phase, tokens, seq)] = [
            jax.device_put(jnp.asarray(rng.integers(0, cfg.vocab_size, (dp * rows, seq)), jnp.int32),
                           NamedSharding(mesh, P(DP))) for _ in range(3)]
    compiled_all = compile_all(model, mesh, base, params, variants, case_inputs, emulate, args.compile_workers)
    for phase, tokens, seq in cases:
        rows = max(1, tokens // seq)
        inputs = case_inputs[(phase, tokens, seq)]
        res = {"label": label, "dp": rank_dp, "emulated": bool(emulate), "phase": phase,
               "tokens_per_rank": rows * seq, "rows": rows, "seq": seq}
        for name, tbo, schedule in variants:
            compiled, res[f"compile_s_{name}"] = compiled_all.pop(((phase, tokens, seq), name))
            med, best = time_fn(lambda x: compiled(params, x), inputs, args.iters)
            res[f"{name}_ms"] = round(med, 3)
            res[f"{name}_min_ms"] = round(best, 3)
            if args.profile and (phase, tokens, seq) == largest:
                profile_steps(os.path.join(args.profile, name),
                              lambda: compiled(params, inputs[0]), steps=3, warmup=0)
            if tbo:
                report = analyze_hlo(compiled.as_text())
                moe = [c for c in report.collectives if c.kind in ("all-gather", "reduce-scatter", "all-reduce")]
                res["hlo" if name == "tbo" else f"{name}_hlo"] = {
                    "collectives": len(moe), "overlapped": sum(c.overlapped for c in moe),
                    "sync": sum(c.is_sync for c in moe)}
                if args.hlo_dir and phase == "prefill" and tokens == max(t for p, t, _ in cases if p == "prefill"):
                    os.makedirs(args.hlo_dir, exist_ok=True)
                    with open(os.path.join(args.hlo_dir, f"{name}_{tokens}.hlo.txt"), "w") as f:
                        f.write(compiled.as_text())
                    with open(os.path.join(args.hlo_dir, f"{name}_{tokens}.overlap.json"), "w") as f:
                        json.dump(report.to_dict(), f, indent=1)
                    print(report.format_table(), flush=True)
            del compiled
        for name, tbo, _ in variants:
            if tbo:
                res["ratio" if name == "tbo" else f"{name}_ratio"] = round(res[f"{name}_ms"] / res["base_ms"], 3)
        res["comm_only_ms"] = round(comm_only(mesh, cfg, rows * seq, cfg.num_layers, dtype, emulate), 3)
        if not args.no_components:  # one layer's routed experts alone, whole step and TBO half
            res["experts_ms"] = round(experts_only(cfg, rank_dp, rows * seq, dtype, args.backend, args.iters), 3)
            res["experts_half_ms"] = round(
                experts_only(cfg, rank_dp, max(1, rows * seq // 2), dtype, args.backend, args.iters), 3)
        rows_out.append(res)
        print(json.dumps(res), flush=True)
        if args.json:  # after every case: a run cut short still leaves its finished rows
            write_json(args.json, dp, rank_dp, label, emulate, cfg, dtype, args.backend, rows_out, args.weights,
                       model.expert_layout)

    tbo_names = [n for n, tbo, _ in variants if tbo]
    head = "".join(f" {n + ' ms':>9} {n + '/base':>10} {'overlap':>9} {'sync':>4}" for n in tbo_names)
    print(f"\n{'':16} {'phase':8} {'tok/rank':>8} {'base ms':>9}{head} {'comm ms':>8}")
    for r in rows_out:
        cells = ""
        for n in tbo_names:
            h = r["hlo" if n == "tbo" else f"{n}_hlo"]
            cells += (f" {r[n + '_ms']:9.3f} {r['ratio' if n == 'tbo' else n + '_ratio']:10.3f} "
                      f"{h['overlapped']:>4}/{h['collectives']:<4} {h['sync']:4d}")
        print(f"{r['label']:16} {r['phase']:8} {r['tokens_per_rank']:8d} {r['base_ms']:9.3f}{cells} "
              f"{r['comm_only_ms']:8.3f}")
    return 0


def write_json(path, dp, rank_dp, label, emulate, cfg, dtype, backend, rows_out, weights="bf16",
               expert_layout="nmajor"):
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "devices": dp, "dp": rank_dp, "label": label,
                   "emulated": bool(emulate), "layers": cfg.num_layers, "dims": model_dims(cfg, dtype),
                   "backend": backend, "weights": weights, "expert_layout": expert_layout, "jax": jax.__version__,
                   "results": rows_out}, f, indent=1)


def compile_all(model, mesh, base, params, variants, case_inputs, emulate, workers: int) -> dict:
    """{(case, variant name): (compiled step, compile seconds)} for every case and variant, the
    XLA compiles run by `workers` threads at once (a compile releases the GIL; one by one, the
    nine compiles of three sizes took most of a device call)."""
    from concurrent.futures import ThreadPoolExecutor

    lowered = {}
    for case, inputs in case_inputs.items():
        for name, tbo, schedule in variants:
            step, _ = make_step(model, mesh, dataclasses.replace(base, tbo_schedule=schedule), place=False,
                                emulate_dp=emulate)
            lowered[(case, name)] = step.lower(params, inputs[0], tbo=tbo)

    def compile_one(item):
        key, low = item
        t0 = time.perf_counter()
        return key, (low.compile(), round(time.perf_counter() - t0, 2))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(pool.map(compile_one, lowered.items()))


def model_dims(cfg, dtype) -> dict:
    """The dimensions the step model (bench/step_model.py) needs, with the measurement."""
    return {"hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
            "num_layers": cfg.num_layers, "dtype_bytes": jnp.dtype(dtype).itemsize}
