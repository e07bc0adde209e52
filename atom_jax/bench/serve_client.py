"""`python -m atom_jax.bench serve`: load an OpenAI-compatible server the way SGLang's
bench_serving does with its `random` dataset, and report throughput and latency.

    python -m atom_jax.bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --random-input-len 1024 --random-output-len 128 --random-range-ratio 0.5 \\
        --request-rate 8 --seed 1 --json out.json

Workload: lengths uniform in [len * range_ratio, len] (atom_jax.bench.workload), prompts are
random token ids sent as `prompt` lists with `ignore_eos: true` and `max_tokens` = the output
length, so every request produces exactly its output length. Arrivals are Poisson at
--request-rate (all at once if inf); --max-concurrency caps requests in flight (both may be
given). Every request streams; the server's `return_token_ids` extension says how many tokens
each chunk carries, and the final usage chunk gives the exact counts.

Metrics (as bench_serving defines them): TTFT = send -> first chunk with tokens; ITL = gaps
between token-carrying chunks; TPOT = (latency - TTFT) / (output tokens - 1) per request;
E2E = send -> last byte. Throughputs divide totals by the wall time of the whole run.
`--endpoint chat` sends random words as one user message instead (lengths then approximate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time

import numpy as np

from atom_jax.bench.metrics import format_latency_sections, new_record, summarize_records
from atom_jax.bench.workload import random_prompt_ids, random_requests

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
          "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="benchmark a running server (bench_serving-style)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="default: the server's first /v1/models entry")
    p.add_argument("--api-key", default=os.environ.get("ATOM_JAX_API_KEY"))
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token id range of random prompts (default: /v1/models' vocab_size)")
    w = p.add_argument_group("workload (bench_serving `random` dataset)")
    w.add_argument("--num-prompts", type=int, default=200)
    w.add_argument("--random-input-len", type=int, default=1024)
    w.add_argument("--random-output-len", type=int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.set_defaults(func=run_cli)
    return p


# ---- one request ---------------------------------------------------------------------------
async def _one_request(client, url: str, payload: dict, headers: dict) -> dict:
    """Stream one request; returns timings and token counts (or an error)."""
    rec = new_record()
    t0 = last = time.perf_counter()
    tokens = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = str(chunk["error"].get("message"))
                    return rec
                if chunk.get("usage"):
                    rec["output_len"] = chunk["usage"]["completion_tokens"]
                    rec["prompt_len"] = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    n = len(choice.get("token_ids") or []) or (1 if text else 0)
                    if not n:
                        continue
                    now = time.perf_counter()
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["itl"].append(now - last)
                    last, tokens = now, tokens + n
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["latency"] = time.perf_counter() - t0
    rec["output_len"] = rec["output_len"] or tokens
    rec["ok"] = rec["ttft"] is not None
    if not rec["ok"]:
        rec["error"] = "no tokens received"
    return rec


def _payload(args, model: str, prompt_ids: list[int], output_len: int, rng) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
              "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if args.endpoint == "chat":
        words = " ".join(rng.choice(_WORDS, size=len(prompt_ids)))
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**common, "prompt": prompt_ids}


# ---- the run -------------------------------------------------------------------------------
async def benchmark(args, requests=None) -> dict:
    """`requests` (workload.SimRequest list): send these instead of the random workload of
    `args.num_prompts` (`bench engine --http` sends the first run's, a prefix of its workload)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), timeout=timeout,
                                 limits=limits) as client:
        card = (await client.get("/v1/models", headers=headers)).raise_for_status().json()["data"][0]
        model = args.model or card["id"]
        vocab = args.vocab_size or card.get("vocab_size") or 256
        reqs = requests if requests is not None else random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
            args.request_rate, args.seed)
        words_rng = np.random.default_rng(args.seed + 2)  # --endpoint chat
        jobs = [(_payload(args, model, ids, r.output_len, words_rng), r)
                for ids, r in zip(random_prompt_ids(reqs, vocab, args.seed), reqs)]
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def run(job):
            (path, payload), _ = job
            if gate is None:
                return await _one_request(client, path, payload, headers)
            async with gate:
                return await _one_request(client, path, payload, headers)

        start = time.perf_counter()
        tasks = []
        for job in jobs:
            delay = job[1].arrival_time - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run(job)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    for rec, (_, r) in zip(results, jobs):
        if rec["prompt_len"] is None:
            rec["prompt_len"] = r.input_len
    return summarize(args, model, results, duration)


def summarize(args, model: str, results: list[dict], duration: float) -> dict:
    return {
        "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "num_prompts": args.num_prompts, "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency, "seed": args.seed,
        **summarize_records(results, duration),
    }


def format_table(res: dict) -> str:
    rows = [
        ("Endpoint", f"{res['base_url']} /v1/{res['endpoint']} ({res['model']})"),
        ("Successful requests", res["completed"]),
        ("Failed requests", res["failed"]),
        ("Benchmark duration (s)", f"{res['duration_s']:.2f}"),
        ("Total input tokens", res["total_input_tokens"]),
        ("Total generated tokens", res["total_output_tokens"]),
        ("Request throughput (req/s)", f"{res['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{res['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{res['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{res['total_token_throughput']:.2f}"),
    ]
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{k + ':':<42}{v}" for k, v in rows]
    lines += format_latency_sections(res)
    lines.append("=" * 60)
    if res["errors"]:
        lines.append("first errors: " + "; ".join(res["errors"][:3]))
    return "\n".join(lines)


def run_cli(args) -> int:
    if args.num_prompts <= 0:
        raise SystemExit("--num-prompts must be > 0")
    res = asyncio.run(benchmark(args))
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["completed"] else 1
