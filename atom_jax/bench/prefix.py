"""`python -m atom_jax.bench prefix`: the real engine on a shared-prefix workload, prefix cache
on vs off in one run (one compiled engine; the scheduler and its cache are reset between modes).

    python -m atom_jax.bench prefix --layers 4 --pair-len 8192            # GPU, V4-Flash dims
    python -m atom_jax.bench prefix --tiny --pair-len 1024 --system-len 512  # CPU

Two parts, each run with the cache off and on:
- pair: one request of --pair-len tokens alone, then a second sharing its first 90%
  (--pair-shared) and continuing with new tokens; TTFT of each, from adding the request to
  the engine output carrying its first token (acceptance on the GPU: the second's TTFT is at
  most 20% of the first's with the cache on), and the engine steps in between (bucket,
  prefill / decode tokens) with the tokens the 2nd took from the cache (--trace: a profile);
  run --pair-repeats times, the cache emptied before each: median TTFTs. Then, cache off, the
  TTFT of a lone prompt as long as the 2nd's uncached part and of one chunk (one step each):
  what one step of those sizes costs.
- conversations: --conversations chats over one --system-len system prompt, --turns rounds;
  each round sends every chat's next user turn (--turn-len new tokens) after its history
  (system prompt, earlier turns and the engine's answers), all at once, and waits for the
  answers (--output-len tokens each). Reports the prefix cache hit rate (hit / queried tokens
  at admission), mean TTFT of the first round and of the later ones, and throughput.
- choices: --choices copies of one --choices-len prompt added at once, each sampled with its own
  seed (what the server runs for a request with n = --choices): the prefill tokens the engine
  computed (cache on: the shared pages once, `RankScheduler.shared_prefill_pages`), its steps,
  the time to the last choice's first token and to the end (--output-len tokens each).
Every bucket is compiled first (Engine.warmup), so no compile lands in a timed run."""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from atom_jax.config import tiny, v4_flash
from atom_jax.engine import Engine, EngineConfig, SamplingParams
from atom_jax.bench.engine import precompile_buckets, random_model_on_mesh
from atom_jax.engine.args import int_list
from atom_jax.loader import random_model
from atom_jax.weights.formats import MODEL_FORMATS


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("prefix", help="the real engine, shared-prefix workload, prefix cache on vs off",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="V4-Flash layers (ignored with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model in float32 (CPU)")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--pair-len", type=int, default=8192)
    ap.add_argument("--pair-shared", type=float, default=0.9)
    ap.add_argument("--pair-repeats", type=int, default=3, help="runs of the pair (median TTFTs)")
    ap.add_argument("--system-len", type=int, default=4096)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--choices", type=int, default=8, help="choices of one prompt (0: skip that part)")
    ap.add_argument("--choices-len", type=int, default=4096)
    ap.add_argument("--page-tokens", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=None, help="default: 2048 (GPU), 256 (--tiny)")
    ap.add_argument("--prefix-state-pages", type=int, default=None,
                    help="pages whose window state the prefix cache keeps (default: the engine's, 4 per slot)")
    ap.add_argument("--buckets", type=int_list, default=None,
                    help="step token buckets (default: the engine's); at full depth name only those the "
                         "workload needs, e.g. 1024,8192 with --chunk-size 8192: each compiles for minutes")
    ap.add_argument("--compile-workers", type=int, default=0,
                    help="threads compiling the buckets' steps at once before warm-up (0: one by one)")
    ap.add_argument("--moe-backend", default="auto")
    ap.add_argument("--weights", choices=MODEL_FORMATS, default="bf16",
                    help="random weights in bf16, packed FP4/FP8 (native) or FP4 experts with dense "
                    "projections (fp4-experts) (ignored with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", metavar="DIR",
                    help="a jax.profiler trace of the pair's 2nd request with the cache on (atom_jax.trace.report reads it)")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def _ttft_alone(engine, prompt, trace: str | None = None) -> tuple[float, dict]:
    """Time from adding `prompt` (alone in the engine) to the output carrying its first token,
    and what the engine did meanwhile: one entry per `Engine.step()` call (its model step's
    bucket, prefill and decode tokens, or an idle tick) and the prefix-cache hit. The engine is
    drained afterwards, untimed. `trace`: a jax.profiler trace of those steps into that dir."""
    before = engine.stats()
    if trace:
        engine.start_profile(trace)
    engine.host_times(reset=True)
    steps, ttft = [], None
    t0 = time.perf_counter()
    engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, ignore_eos=True))
    while ttft is None and engine.has_unfinished():
        ticks = engine.stats()["steps"]
        outs = engine.step()
        t = time.perf_counter() - t0
        st = engine.stats()
        last = st["last_step"] if st["steps"] > ticks else None
        steps.append({"ms": round(1e3 * t, 2), "bucket": last["bucket"] if last else 0,
                      "prefill_tokens": last["prefill_tokens"] if last else 0,
                      "decode_tokens": last["decode_tokens"] if last else 0})
        if any(o.new_token_ids for o in outs):
            ttft = t
    host = engine.host_times(reset=True)  # ms per Engine.step() call by phase, up to the first token
    if trace:
        engine.stop_profile()
    while engine.has_unfinished():
        engine.step()
    after = engine.stats()["prefix_cache"]
    hit = after.get("hit_tokens", 0) - before["prefix_cache"].get("hit_tokens", 0)
    return ttft, {"hit_tokens": hit, "steps": steps, "host_ms": host}


def run_pair(engine, rng, vocab, length, shared, prefix_caching: bool, repeats: int = 1,
             trace: str | None = None) -> dict:
    """The pair `repeats` times (the same prompts, the cache emptied before each): median TTFTs;
    the step logs of the last repeat (`trace`: profile its 2nd request)."""
    first = list(map(int, rng.integers(2, vocab, length)))
    k = int(length * shared)
    second = first[:k] + list(map(int, rng.integers(2, vocab, length - k)))
    ta, tb = [], []
    for i in range(repeats):
        engine.reset_scheduler(prefix_caching=prefix_caching)
        (a, sa), (b, sb) = (_ttft_alone(engine, first),
                            _ttft_alone(engine, second, trace if i == repeats - 1 else None))
        ta.append(a)
        tb.append(b)
    a, b = float(np.median(ta)), float(np.median(tb))
    return {"ttft_first_ms": round(1e3 * a, 2), "ttft_second_ms": round(1e3 * b, 2),
            "second_over_first": round(b / a, 4), "ttft_first_all_ms": [round(1e3 * t, 2) for t in ta],
            "ttft_second_all_ms": [round(1e3 * t, 2) for t in tb], "first_steps": sa["steps"],
            "second_hit_tokens": sb["hit_tokens"], "second_steps": sb["steps"],
            "first_host_ms": sa["host_ms"], "second_host_ms": sb["host_ms"]}


def model_step_bucket(steps: list[dict]) -> int:
    """The bucket of the first model step in a `_ttft_alone` step log (0: none); the engine's
    first calls may be idle ticks (a prefill gate holding the prefill a moment)."""
    return next((s["bucket"] for s in steps if s["bucket"]), 0)


def run_one_step(engine, rng, vocab, sizes, repeats: int) -> dict:
    """TTFT of a lone prompt of n tokens (n <= the chunk: one step) with the cache off, median
    of `repeats`: one step's cost at each size, for reading the pair's 2nd TTFT against."""
    engine.reset_scheduler(prefix_caching=False)
    out = {}
    for n in sizes:
        runs = [_ttft_alone(engine, list(map(int, rng.integers(2, vocab, n)))) for _ in range(repeats)]
        out[n] = {"ttft_ms": round(1e3 * float(np.median([t for t, _ in runs])), 2),
                  "bucket": model_step_bucket(runs[-1][1]["steps"])}
    return out


def run_conversations(engine, rng, vocab, args) -> dict:
    system = list(map(int, rng.integers(2, vocab, args.system_len)))
    history = [list(system) for _ in range(args.conversations)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    ttft = {}  # round -> list of seconds
    in_tokens = out_tokens = 0
    t_all = time.perf_counter()
    for turn in range(args.turns):
        started, answers = {}, {}
        for c in range(args.conversations):
            history[c] += list(map(int, rng.integers(2, vocab, args.turn_len)))
            rid = engine.add_request(prompt_token_ids=history[c], params=params, request_id=f"c{c}t{turn}")
            started[rid] = (c, time.perf_counter())
            in_tokens += len(history[c])
        while engine.has_unfinished():
            for o in engine.step():
                c, t0 = started[o.request_id]
                if o.new_token_ids and o.num_tokens == len(o.new_token_ids):  # the first tokens (num_tokens: no list built)
                    ttft.setdefault(turn, []).append(time.perf_counter() - t0)
                if o.finished:
                    answers[c] = o.token_ids
                    out_tokens += len(o.token_ids)
        for c, toks in answers.items():
            history[c] += toks
    wall = time.perf_counter() - t_all
    pc = engine.stats()["prefix_cache"]
    later = [t for k, v in ttft.items() if k > 0 for t in v]
    return {"hit_rate": round(pc["hit_tokens"] / pc["queried_tokens"], 4) if pc.get("queried_tokens") else 0.0,
            "hit_tokens": pc.get("hit_tokens", 0), "queried_tokens": pc.get("queried_tokens", 0),
            "state_evictions": pc.get("state_evictions", 0),
            "ttft_first_round_ms": round(1e3 * float(np.mean(ttft[0])), 2),
            "ttft_later_rounds_ms": round(1e3 * float(np.mean(later)), 2) if later else None,
            "wall_s": round(wall, 3), "input_tok_s": round(in_tokens / wall, 1),
            "output_tok_s": round(out_tokens / wall, 1), "total_tok_s": round((in_tokens + out_tokens) / wall, 1)}


def run_choices(engine, rng, vocab, args) -> dict:
    prompt = list(map(int, rng.integers(2, vocab, args.choices_len)))
    before = engine.stats()
    first = {}
    t0 = time.perf_counter()
    for i in range(args.choices):
        engine.add_request(prompt_token_ids=prompt, request_id=f"n{i}", params=SamplingParams(
            max_tokens=args.output_len, ignore_eos=True, temperature=1.0, seed=i))
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    after = engine.stats()
    return {"choices_prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
            "choices_steps": after["steps"] - before["steps"],
            "choices_ttft_last_ms": round(1e3 * max(first.values()), 2), "choices_wall_s": round(wall, 3)}


def run_cli(args) -> int:
    cfg = tiny() if args.tiny else v4_flash(num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    pt = args.page_tokens
    chunk = args.chunk_size or (256 if args.tiny else 2048)
    longest = max(args.pair_len, args.system_len + args.turns * (args.turn_len + args.output_len),
                  args.choices_len + args.output_len)
    max_len = -(-(longest + 1) // pt) * pt
    # every conversation resident at once, plus room for the cache to keep what finished
    pages = 2 * max(max(args.conversations, args.choices) // args.dp + 1, 2) * (max_len // pt)
    ec = EngineConfig(dp=args.dp, dtype=str(jnp.dtype(dtype)), num_slots=max(args.conversations, args.choices, 4),
                      num_pages=pages, page_tokens=pt, max_model_len=max_len, max_tokens_per_step=chunk,
                      chunk_size=chunk, moe_backend=args.moe_backend, seed=args.seed,
                      compilation_cache_dir=None, weights="bf16" if args.tiny else args.weights,
                      prefix_state_pages=args.prefix_state_pages, buckets=args.buckets)
    t0 = time.perf_counter()
    if args.tiny:
        model = random_model(cfg, seed=args.seed, dtype=dtype)
    else:  # created on the devices, sharded as the engine places it
        model = random_model_on_mesh(cfg, args.dp, dtype, ec.expert_mode, args.seed, ec.weights,
                                     ec.expert_layout_on(jax.default_backend()))
    engine = Engine(ec, model=model, tokenizer=None)
    compiled = precompile_buckets(engine, args.compile_workers) if args.compile_workers > 0 else {}
    engine.warmup()
    warm_s = time.perf_counter() - t0
    rows = []
    for on in (False, True):
        rng = np.random.default_rng(args.seed)  # the same prompts for both modes
        row = {"prefix_cache": "on" if on else "off",
               **run_pair(engine, rng, cfg.vocab_size, args.pair_len, args.pair_shared, on, args.pair_repeats,
                          args.trace if on else None)}
        engine.reset_scheduler(prefix_caching=on)  # the conversations start with an empty cache
        if args.conversations:  # 0: the pair alone
            row.update(run_conversations(engine, rng, cfg.vocab_size, args))
        if args.choices:
            engine.reset_scheduler(prefix_caching=on)
            row.update(run_choices(engine, rng, cfg.vocab_size, args))
        row["compiles_after_warmup"] = engine.snapshot()["step_compiles"]["after_warmup"]
        rows.append(row)
    # the step's cost without the cache: a lone prompt of the 2nd's uncached tokens, and of a chunk
    sizes = sorted({args.pair_len - rows[1]["second_hit_tokens"], min(chunk, args.pair_len)})
    one_step = run_one_step(engine, np.random.default_rng(args.seed + 1), cfg.vocab_size, sizes, args.pair_repeats)
    device = jax.devices()[0].device_kind
    print(f"{device}, dp={args.dp}, {'tiny' if args.tiny else f'V4-Flash dims, {args.layers} layers'}; "
          f"{ec.num_slots} slots, {ec.num_pages} pages of {pt} tokens, window state kept for "
          f"{engine.layout.state_pages}; build + warm-up {warm_s:.1f} s")
    print(f"pair: {args.pair_len} tokens, then {args.pair_shared:.0%} shared | conversations: "
          f"{args.conversations} x {args.turns} turns, system {args.system_len}, turn {args.turn_len}, "
          f"answer {args.output_len} | choices: {args.choices} of one {args.choices_len}-token prompt")
    head = ("cache", "TTFT 1st ms", "TTFT 2nd ms", "2nd/1st", "hit rate", "TTFT r1 ms", "TTFT r2+ ms",
            "total tok/s", "out tok/s", "state evict", "n: prefill", "n: steps", "n: TTFT ms", "n: wall s")
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        vals = [r.get(k, "-") for k in ("prefix_cache", "ttft_first_ms", "ttft_second_ms", "second_over_first",
                                         "hit_rate", "ttft_first_round_ms", "ttft_later_rounds_ms", "total_tok_s",
                                         "output_tok_s", "state_evictions", "choices_prefill_tokens",
                                         "choices_steps", "choices_ttft_last_ms", "choices_wall_s")]
        print(" ".join(f"{v:>12}" for v in vals))
    for r in rows:  # what the engine did from the 2nd request's arrival to its first token
        steps = ", ".join(f"{s['ms']} ms: " + (f"bucket {s['bucket']} ({s['prefill_tokens']} prefill, "
                                                  f"{s['decode_tokens']} decode)" if s["bucket"] else "idle")
                          for s in r["second_steps"])
        print(f"pair 2nd, cache {r['prefix_cache']}: {r['second_hit_tokens']} tokens from the cache; "
              f"engine steps to its first token: {steps}")
        h = r["second_host_ms"]
        print(f"   its host time per Engine.step() call (ms, wall; {h.get('steps')} calls): " +
              ", ".join(f"{k} {v}" for k, v in h.items() if k not in ("steps", "cpu", "dispatch_thread")))
    print("one step alone (cache off, from position 0), TTFT: " +
          ", ".join(f"{n} tokens (bucket {v['bucket']}) {v['ttft_ms']} ms" for n, v in one_step.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dp": args.dp, "model": "tiny" if args.tiny else f"v4-flash-{args.layers}l",
                       "args": vars(args) | {"func": None}, "warmup_s": round(warm_s, 1), "precompile_s": compiled,
                       "num_slots": ec.num_slots, "num_pages": ec.num_pages, "state_pages": engine.layout.state_pages,
                       "results": rows, "one_step": one_step}, f, indent=1)
    return 0
