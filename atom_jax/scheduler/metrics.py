"""Scheduler counters: per step (last_step) and cumulative; snapshot() feeds /metrics later."""

from __future__ import annotations

import collections
import dataclasses

from atom_jax.scheduler.delayer import OUTCOMES, DelayDecision


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    bucket: int
    tbo: bool
    real_tokens: int      # over all ranks
    slot_tokens: int      # dp * bucket
    padding_waste: float  # 1 - real / (dp * bucket)
    prefill_tokens: int
    decode_tokens: int
    delayer_outcome: str


class SchedulerMetrics:
    def __init__(self, dp: int):
        self.dp = dp
        self.ticks = 0           # schedule() calls
        self.steps = 0           # ticks that produced work (the engine ran the model)
        self.idle_ticks = 0      # ticks with no real token on any rank (nothing to run)
        self.real_tokens = 0
        self.slot_tokens = 0     # sum of dp * bucket over steps
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.step_waste_sum = 0.0
        self.tbo_on_steps = 0
        self.tbo_off_steps = 0
        self.delayer = {o: 0 for o in OUTCOMES}
        self.wait_passes_total = 0  # delayed ticks, summed
        self.wait_passes_max = 0    # longest single wait, in ticks
        self.waits_ended = 0        # allowed ticks that ended a wait of >= 1 tick
        self.bucket_steps: collections.Counter[int] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.num_running = 0
        self.num_waiting = 0
        self.num_preemptions = 0
        # prefix cache, all ranks: queries, hits, queried_tokens, hit_tokens (per admission),
        # cached_pages (registered now), evictions, state_evictions (window state dropped)
        self.prefix_cache: dict[str, int] = {}
        self.last_step: StepRecord | None = None

    @property
    def padded_tokens(self) -> int:
        return self.slot_tokens - self.real_tokens

    @property
    def padding_waste(self) -> float:
        """Cumulative, token-weighted: padded / (dp * bucket) summed over steps."""
        return self.padded_tokens / self.slot_tokens if self.slot_tokens else 0.0

    @property
    def mean_step_padding_waste(self) -> float:
        return self.step_waste_sum / self.steps if self.steps else 0.0

    def record_decision(self, d: DelayDecision) -> None:
        self.ticks += 1
        self.delayer[d.outcome] += 1
        if d.outcome == "delay":
            self.wait_passes_total += 1
            self.wait_passes_max = max(self.wait_passes_max, d.waited)
        elif d.waited:
            self.waits_ended += 1

    def record_step(self, rec: StepRecord | None) -> None:
        if rec is None:
            self.idle_ticks += 1
            return
        self.steps += 1
        self.real_tokens += rec.real_tokens
        self.slot_tokens += rec.slot_tokens
        self.prefill_tokens += rec.prefill_tokens
        self.decode_tokens += rec.decode_tokens
        self.step_waste_sum += rec.padding_waste
        self.bucket_steps[rec.bucket] += 1
        if rec.tbo:
            self.tbo_on_steps += 1
        else:
            self.tbo_off_steps += 1
        self.last_step = rec

    def snapshot(self) -> dict:
        """Plain dict of numbers (and small dicts of numbers) for JSON or Prometheus."""
        return {
            "ticks": self.ticks,
            "steps": self.steps,
            "idle_ticks": self.idle_ticks,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "slot_tokens": self.slot_tokens,
            "padding_waste": self.padding_waste,
            "mean_step_padding_waste": self.mean_step_padding_waste,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "delayer": dict(self.delayer),
            "wait_passes_total": self.wait_passes_total,
            "wait_passes_max": self.wait_passes_max,
            "waits_ended": self.waits_ended,
            "tbo_on_steps": self.tbo_on_steps,
            "tbo_off_steps": self.tbo_off_steps,
            "bucket_steps": {str(b): n for b, n in sorted(self.bucket_steps.items())},
            "finished": dict(self.finished),
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_preemptions": self.num_preemptions,
            "prefix_cache": dict(self.prefix_cache),
            "last_step": dataclasses.asdict(self.last_step) if self.last_step else None,
        }
