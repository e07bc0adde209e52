"""Per-request latency and throughput as SGLang's bench_serving defines them, shared by the
HTTP client (`bench serve`) and the in-process engine benchmark (`bench engine`), so the two
report the same numbers for the same run.

A request record is a dict: ok, prompt_len, output_len, ttft (send -> first token, seconds),
itl (gaps between token-carrying outputs), latency (send -> finished), error.
TPOT = (latency - TTFT) / (output tokens - 1) per request; throughputs divide totals by the
wall time of the whole run."""

from __future__ import annotations

import numpy as np


def new_record(prompt_len: int | None = None) -> dict:
    return {"ok": False, "ttft": None, "itl": [], "latency": None, "output_len": 0,
            "prompt_len": prompt_len, "error": None}


def latency_stats(xs: list[float]) -> dict:
    """mean / median / p99 in milliseconds (zeros when empty)."""
    if not xs:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    a = np.asarray(xs) * 1000.0
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)),
            "p99_ms": float(np.percentile(a, 99))}


def summarize_records(results: list[dict], duration: float) -> dict:
    ok = [r for r in results if r["ok"]]
    total_in = sum(r["prompt_len"] for r in ok)
    total_out = sum(r["output_len"] for r in ok)
    tpot = [(r["latency"] - r["ttft"]) / (r["output_len"] - 1) for r in ok if r["output_len"] > 1]
    rate = (lambda n: n / duration) if duration else (lambda n: 0.0)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [r["error"] for r in results if not r["ok"]][:10],
        "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": rate(len(ok)),
        "input_throughput": rate(total_in),
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
        "ttft": latency_stats([r["ttft"] for r in ok]),
        "tpot": latency_stats(tpot),
        "itl": latency_stats([x for r in ok for x in r["itl"]]),
        "e2e_latency": latency_stats([r["latency"] for r in ok]),
    }


LATENCY_SECTIONS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                    ("itl", "Inter-token Latency"), ("e2e_latency", "End-to-end Latency"))


def format_latency_sections(res: dict) -> list[str]:
    lines = []
    for key, title in LATENCY_SECTIONS:
        lines.append("{:-^60}".format(f" {title} "))
        short = key.upper() if key != "e2e_latency" else "E2E Latency"
        for stat, label in (("mean_ms", "Mean"), ("median_ms", "Median"), ("p99_ms", "P99")):
            lines.append(f"{f'{label} {short} (ms):':<42}{res[key][stat]:.2f}")
    return lines
