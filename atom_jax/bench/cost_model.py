"""A step-time model for the simulator: no device, just a formula over the StepPlan.

Calibrated (`StepCostModel.calibrated`, `bench sim --calibration`): the step model that
`bench tbo-model` fits to `bench dp-step` runs gives the time of a step of `bucket` tokens per
rank at the simulated dp, base or TBO as planned (attention, all-gather, routed experts with
their weight-read floor, reduce-scatter, per layer of the full model):

    t(step) = step_model(dp, bucket, tbo) + c * max_r attn_pairs_r

Uncalibrated (illustrative constants, not a measurement):

    t(step) = (a + b * bucket + c * max_r attn_pairs_r) * (tbo_factor if TBO else 1)

- a: fixed cost of one step (streaming the MoE and attention weights once, launches,
  collective latency). It dominates decode steps.
- b: cost per token slot of the bucket on a rank. Shapes are static, so padded slots cost
  the same as real tokens: this is what padding waste costs in time.
- c: cost per causal query-key pair of real tokens on the busiest rank (ranks run in lockstep,
  the slowest sets the pace); chunk [s, s+n) has n*s + n*(n+1)/2 pairs. V4's sliding window
  and compressed entries make true attention cheaper; this is an "attention-ish" term. It stays
  illustrative in both forms (the calibration times attention over 1024-token sequences
  without a cache, so context length beyond that is not in it).
- tbo_factor: an illustrative 0.9; the measured TBO step is 1.04-1.16x of one chain at 4-8K
  tokens per rank on 2 GPUs and gains only with more ranks, which only the calibrated form
  models.
Defaults are illustrative orders of magnitude for a large MoE on one H100-class GPU per rank
(2048-token bucket about 70 ms, 64-token decode step about 12 ms).
An empty tick (no rank has a real token; the delayer is holding work back) runs no model and
costs `idle_tick` of host time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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

    # calibrated form: a fitted tbo_model.StepModel and the simulated dp (replace a, b, tbo_factor)
    step_model: Any = None
    dp: int = 1

    @classmethod
    def calibrated(cls, step_model, dp: int, **kw) -> "StepCostModel":
        return cls(step_model=step_model, dp=dp, **kw)

    def step_time(self, plan: StepPlan) -> float:
        if plan.is_empty:
            return self.idle_tick
        attn = max(self.attn_pairs(w) for w in plan.per_rank)
        if self.step_model is not None:
            return self.step_model.step_ms(self.dp, plan.bucket, plan.tbo) / 1e3 + self.c * attn
        t = self.a + self.b * plan.bucket + self.c * attn
        return t * (self.tbo_factor if plan.tbo else 1.0)
