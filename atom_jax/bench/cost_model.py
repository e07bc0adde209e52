"""A step-time model for the simulator: no device, just a formula over the StepPlan.

    t(step) = (a + b * bucket + c * max_r attn_pairs_r) * (tbo_factor if TBO else 1)

- a: fixed cost of one step (streaming the MoE and attention weights once, launches,
  collective latency). It dominates decode steps.
- b: cost per token slot of the bucket on a rank. Shapes are static, so padded slots cost
  the same as real tokens: this is what padding waste costs in time.
- c: cost per causal query-key pair of real tokens on the busiest rank (ranks run in lockstep,
  the slowest sets the pace); chunk [s, s+n) has n*s + n*(n+1)/2 pairs. V4's sliding window
  and compressed entries make true attention cheaper; this is an "attention-ish" term.
- tbo_factor: the TBO step measured 0.90x of one chain at 4K tokens per rank (docs/design.md,
  "Measured facts"; it is only switched on above tbo_min_tokens).
Defaults are illustrative orders of magnitude for a large MoE on one H100-class GPU per rank
(2048-token bucket about 70 ms, 64-token decode step about 12 ms), not a measurement.
An empty tick (no rank has a real token; the delayer is holding work back) runs no model and
costs `idle_tick` of host time.
"""

from __future__ import annotations

import dataclasses

from atom_jax.scheduler import StepPlan


@dataclasses.dataclass(frozen=True)
class StepCostModel:
    a: float = 0.010
    b: float = 30e-6
    c: float = 2e-10
    tbo_factor: float = 0.9
    idle_tick: float = 0.001

    def attn_pairs(self, work) -> int:
        return sum(c.num_tokens * c.start_pos + c.num_tokens * (c.num_tokens + 1) // 2
                   for c in work)

    def step_time(self, plan: StepPlan) -> float:
        if plan.is_empty:
            return self.idle_tick
        attn = max(self.attn_pairs(w) for w in plan.per_rank)
        t = self.a + self.b * plan.bucket + self.c * attn
        return t * (self.tbo_factor if plan.tbo else 1.0)
