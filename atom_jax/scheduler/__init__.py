"""Host-side scheduling: requests, cache pages and slots, continuous batching per DP rank,
the cross-rank prefill gate (PrefillDelayer / coalescer), shape buckets and TBO choice.
Pure Python; the model runner drives it one step at a time (see DPScheduler)."""

from atom_jax.scheduler.delayer import (DelayDecision, NoDelayer, PrefillCoalescer,
                                        PrefillDelayer, make_delayer)
from atom_jax.scheduler.dp_scheduler import DPScheduler, StepOutput, StepPlan, default_buckets
from atom_jax.scheduler.metrics import SchedulerMetrics, StepRecord
from atom_jax.scheduler.pages import PageAllocator, SlotAllocator, pages_for
from atom_jax.scheduler.rank_scheduler import (ChunkWork, PrefillOutlook, RankConfig,
                                               RankScheduler)
from atom_jax.scheduler.sampling_params import SamplingParams
from atom_jax.scheduler.sequence import FINISH_REASONS, PENDING, Sequence, SeqStatus
from atom_jax.scheduler.tbo_policy import TBO_MIN_TOKENS, crossover_min_tokens

__all__ = [
    "ChunkWork", "DPScheduler", "DelayDecision", "FINISH_REASONS", "NoDelayer",
    "PENDING", "PageAllocator", "PrefillCoalescer", "PrefillDelayer", "PrefillOutlook", "RankConfig",
    "RankScheduler", "SamplingParams", "SchedulerMetrics", "Sequence", "SeqStatus",
    "SlotAllocator", "StepOutput", "StepPlan", "StepRecord", "TBO_MIN_TOKENS", "crossover_min_tokens",
    "default_buckets", "make_delayer", "pages_for",
]
