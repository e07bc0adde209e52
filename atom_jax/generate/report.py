"""Progress bar (tqdm when installed, else a periodic stderr line) and the end-of-run summary."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time


@dataclasses.dataclass
class RunStats:
    input_lines: int = 0  # non-blank input lines
    skipped: int = 0  # ids already in the output from an earlier run
    bad: int = 0  # lines reported and skipped
    done: int = 0  # result lines written by this run (failed ones included)
    failed: int = 0  # results with finish_reason "error"
    not_run: int = 0  # left for a rerun (interrupted, or the engine broke)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0  # whole run, model loading included
    generate_s: float = 0.0  # from the first request added to the last result written
    padding_waste: float | None = None  # of this run's steps (engine.stats() deltas)
    finish_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["finish_reasons"] = dict(self.finish_reasons)
        gen = self.generate_s or float("nan")
        d["requests_per_s"] = _finite(self.done / gen)
        d["generated_tokens_per_s"] = _finite(self.completion_tokens / gen)
        d["total_tokens_per_s"] = _finite((self.prompt_tokens + self.completion_tokens) / gen)
        return d


def _finite(x: float) -> float | None:
    return x if x == x and x != float("inf") else None  # JSON has no NaN


def summary_text(stats: RunStats) -> str:
    d = stats.as_dict()
    rate = lambda k: f"{d[k]:.1f}" if d[k] is not None else "-"  # noqa: E731
    waste = f"{stats.padding_waste:.1%}" if stats.padding_waste is not None else "-"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.finish_reasons.items())) or "-"
    lines = [
        f"requests:   {stats.done} done ({stats.failed} failed), {stats.skipped} skipped (already in output), "
        f"{stats.bad} bad lines, {stats.not_run} not run",
        f"finish:     {reasons}",
        f"tokens:     {stats.prompt_tokens} prompt, {stats.completion_tokens} generated",
        f"time:       {stats.wall_s:.2f}s wall, {stats.generate_s:.2f}s generating",
        f"throughput: {rate('requests_per_s')} req/s, {rate('generated_tokens_per_s')} generated tok/s, "
        f"{rate('total_tokens_per_s')} total tok/s (over the generating time)",
        f"padding:    {waste} of step slots were padding",
    ]
    return "\n".join("generate: " + s for s in lines)


def write_summary_json(path: str, stats: RunStats, engine_stats: dict | None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**stats.as_dict(), "engine": engine_stats}, f, indent=2)
        f.write("\n")


class Progress:
    """Requests finished out of `total`, with generated tokens per second."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.requests = self.tokens = 0
        self.start = time.monotonic()
        self._last_print = 0.0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="req", file=self.stream, dynamic_ncols=True, desc="generate")

    def update(self, finished_requests: int, new_tokens: int) -> None:
        self.requests += finished_requests
        self.tokens += new_tokens
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            if finished_requests:
                self._bar.update(finished_requests)
            if now - self._last_print >= 0.5:  # set_postfix redraws; keep it off the hot loop
                self._bar.set_postfix_str(f"{self.rate():.1f} tok/s", refresh=False)
                self._last_print = now
        elif now - self._last_print >= 2.0:
            self._print_line()
            self._last_print = now

    def rate(self) -> float:
        dt = time.monotonic() - self.start
        return self.tokens / dt if dt > 0 else 0.0

    def _print_line(self) -> None:
        print(f"generate: {self.requests}/{self.total} requests, {self.tokens} tokens, "
              f"{self.rate():.1f} tok/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.rate():.1f} tok/s", refresh=False)
            self._bar.close()
        elif self.enabled:
            self._print_line()
