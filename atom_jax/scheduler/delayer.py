"""Cross-rank prefill gating: keep the DP ranks in the same phase (docs/design.md, "Keeping
the ranks in step").

All ranks share one step shape, so one rank prefilling while the others decode pads the
decoders up to the prefill bucket. Each tick a gate looks at every rank's PrefillOutlook and
decides, for all ranks at once, whether prefill may run. Decisions depend only on the outlooks
and on tick counters (never clocks), so every host computes the same answer.

Outcomes: "allow" (nothing to align, all ranks ready, or the fill target reached), "delay",
"timeout" (waited the maximum), "watermark" (a ready rank's KV usage forces it), "stall"
(coalescer only: no decode runs anywhere, so waiting would only idle the machines).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from atom_jax.scheduler.rank_scheduler import PrefillOutlook

OUTCOMES = ("allow", "delay", "timeout", "watermark", "stall")


@dataclasses.dataclass(frozen=True)
class DelayDecision:
    allow: bool
    outcome: str   # one of OUTCOMES
    state: str     # how many ranks could prefill: "all", "none" or "mixed"
    waited: int    # ticks delayed so far in the current wait (0 when not waiting)


def classify(outlooks: Seq[PrefillOutlook]) -> str:
    n = sum(o.prefillable for o in outlooks)
    return "none" if n == 0 else "all" if n == len(outlooks) else "mixed"


class NoDelayer:
    """Mode "off": prefill always allowed."""

    def decide(self, outlooks: Seq[PrefillOutlook]) -> DelayDecision:
        return DelayDecision(True, "allow", classify(outlooks), 0)


class _TickGate:
    """Shared by the gates that hold prefill back: a run of delayed ticks ends on an allow."""

    _delayed = 0

    def _allow(self, outcome: str, state: str, waited: int) -> DelayDecision:
        self._delayed = 0
        return DelayDecision(True, outcome, state, waited)


class PrefillDelayer(_TickGate):
    """Mode "on" (SGLang/ATOM PrefillDelayer).

    all / none -> allow. mixed (among the ranks with work: one that neither prefills nor
    decodes is left out) -> delay; a run of `max_delay_passes` consecutive delayed
    ticks is followed by an allowed tick ("timeout"), after which the count starts again.
    In a mixed tick, a prefillable rank whose KV usage is under `low_watermark` forces allow
    (a nearly empty rank should not sit idle; None disables). The first tick ever is allowed.
    """

    def __init__(self, max_delay_passes: int = 30, low_watermark: float | None = None):
        if max_delay_passes < 0:
            raise ValueError(f"max_delay_passes must be >= 0, got {max_delay_passes}")
        self.max_delay_passes = max_delay_passes
        self.low_watermark = low_watermark
        self._delayed = 0
        self._ticks = 0

    def decide(self, outlooks: Seq[PrefillOutlook]) -> DelayDecision:
        self._ticks += 1
        state = classify(outlooks)
        waited = self._delayed
        # A rank with nothing to prefill and nothing to decode is padding either way: waiting
        # for it aligns nothing (n choices of one prompt share one rank; a lone request).
        busy = [o for o in outlooks if o.prefillable or o.num_decodes]
        if self._ticks == 1 or classify(busy) != "mixed":
            return self._allow("allow", state, waited)
        lw = self.low_watermark
        if lw is not None and any(o.prefillable and o.kv_usage < lw for o in outlooks):
            return self._allow("watermark", state, waited)
        if self._delayed >= self.max_delay_passes:
            return self._allow("timeout", state, waited)
        self._delayed += 1
        return DelayDecision(False, "delay", state, self._delayed)



class PrefillCoalescer(_TickGate):
    """Mode "coalesce" (ATOM's successor to the delayer): hold prefill until the tokens the
    ranks could prefill this tick fill `target_fraction` of their total token budget, so
    prefill steps run with full buckets on every rank.

    Exits from a wait: no rank is decoding ("stall": nothing else would run), a prefillable
    rank's KV usage is at or above `high_watermark` (its admissions are memory-bound, so the
    fill may never come: "watermark"), or `max_wait_ticks` delayed ticks ("timeout").
    The first tick ever is allowed.

    Defaults from the simulator (input ~2048, output ~256, dp=8; results in the docstring of
    atom_jax/bench/sim.py): target 0.75 matched or beat the delayer's throughput with less
    padding; the watermark exit is off because under KV pressure it admitted piecemeal
    prefills that were then preempted (waste 24% without it, 74% at 0.9).
    """

    def __init__(self, target_fraction: float = 0.75, max_wait_ticks: int = 30,
                 high_watermark: float | None = None):
        if not 0.0 < target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
        if max_wait_ticks < 0:
            raise ValueError(f"max_wait_ticks must be >= 0, got {max_wait_ticks}")
        self.target_fraction = target_fraction
        self.max_wait_ticks = max_wait_ticks
        self.high_watermark = high_watermark
        self._delayed = 0
        self._ticks = 0

    def fill(self, outlooks: Seq[PrefillOutlook]) -> float:
        budget = sum(o.token_budget for o in outlooks)
        return sum(o.ready_tokens for o in outlooks) / budget if budget else 1.0

    def decide(self, outlooks: Seq[PrefillOutlook]) -> DelayDecision:
        self._ticks += 1
        state = classify(outlooks)
        waited = self._delayed
        if self._ticks == 1 or state == "none" or self.fill(outlooks) >= self.target_fraction:
            return self._allow("allow", state, waited)
        if not any(o.num_decodes for o in outlooks):
            return self._allow("stall", state, waited)
        hw = self.high_watermark
        if hw is not None and any(o.prefillable and o.kv_usage >= hw for o in outlooks):
            return self._allow("watermark", state, waited)
        if self._delayed >= self.max_wait_ticks:
            return self._allow("timeout", state, waited)
        self._delayed += 1
        return DelayDecision(False, "delay", state, self._delayed)



def make_delayer(mode: str = "on", *, max_delay_passes: int = 30,
                 low_watermark: float | None = None, target_fraction: float = 0.75,
                 max_wait_ticks: int = 30, high_watermark: float | None = None):
    """Build the prefill gate for `mode` in {"off", "on", "coalesce"}."""
    if mode == "off":
        return NoDelayer()
    if mode == "on":
        return PrefillDelayer(max_delay_passes, low_watermark)
    if mode == "coalesce":
        return PrefillCoalescer(target_fraction, max_wait_ticks, high_watermark)
    raise ValueError(f"delayer mode must be 'off', 'on' or 'coalesce', got {mode!r}")
