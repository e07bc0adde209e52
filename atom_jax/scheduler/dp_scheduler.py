"""The step planner over all DP ranks: one prefill gate, one bucket and one TBO choice.

Every host runs an identical DPScheduler over the same request stream, so every host plans
the same step (all decisions are functions of scheduler state and tick counts only).

Driving it (one engine loop iteration):

    for seq in new_requests: sched.add(seq)          # also: sched.abort(id), sched.fail(id)
    plan = sched.schedule()
    if not plan.is_empty:
        # per rank r: pack plan.per_rank[r] (c.token_ids(), positions c.start_pos..,
        # c.seq.slot, c.seq.pages) into a plan.bucket-token buffer, zero real tokens allowed;
        # run the step (TBO if plan.tbo); sample after every chunk with c.sample.
        out = sched.on_step_done(plan, {request_id: token_id, ...})
        # out.new_tokens: stream them; out.finished: final responses (any reason).
"""

from __future__ import annotations

import bisect
import dataclasses

from atom_jax.scheduler.delayer import DelayDecision, make_delayer
from atom_jax.scheduler.metrics import SchedulerMetrics, StepRecord
from atom_jax.scheduler.rank_scheduler import ChunkWork, PrefixCacheStats, RankConfig, RankScheduler
from atom_jax.scheduler.sequence import Sequence
from atom_jax.scheduler.tbo_policy import crossover_min_tokens


_PREFIX_STATS = tuple(f.name for f in dataclasses.fields(PrefixCacheStats))


def default_buckets(max_tokens_per_step: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below the budget, plus the budget itself."""
    out, b = [], smallest
    while b < max_tokens_per_step:
        out.append(b)
        b *= 2
    return tuple(out) + (max_tokens_per_step,)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    step: int                          # tick index (0-based)
    per_rank: list[list[ChunkWork]]    # every rank's chunks, in running order
    bucket: int                        # tokens per rank buffer; 0 = nothing to run anywhere
    tbo: bool                          # two-batch overlap for this step (same on all ranks)
    real_tokens: list[int]             # per rank
    padding_waste: float               # 1 - sum(real) / (dp * bucket)
    decision: DelayDecision

    @property
    def is_empty(self) -> bool:
        """No rank has a real token: the engine may skip the model for this tick."""
        return self.bucket == 0

    def sampled(self) -> list[Sequence]:
        """The sequences this step samples a token for, rank by rank in running order: the
        order of the model runner's sampling rows (and of the tokens it returns)."""
        return [c.seq for work in self.per_rank for c in work if c.sample]


@dataclasses.dataclass(frozen=True)
class StepOutput:
    new_tokens: list[tuple[Sequence, int]]  # every token appended this step
    finished: list[Sequence]  # everything that finished since the last step (any reason)


class DPScheduler:
    def __init__(self, dp: int, rank_config: RankConfig | None = None, buckets=None,
                 delayer=None, tbo_min_tokens: int | None = None, eos_token_ids=(),
                 tbo: bool | None = None):
        """`tbo`: True / False force two-batch overlap on / off for every step that can split;
        None (auto) turns it on for buckets of at least `tbo_min_tokens`, by default this dp's
        crossover (`tbo_policy.crossover_min_tokens`: measured / modelled, None: never)."""
        if dp <= 0:
            raise ValueError(f"dp must be > 0, got {dp}")
        self.dp = dp
        self.rank_config = (rank_config or RankConfig()).validate()
        budget = self.rank_config.max_tokens_per_step
        self.buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(budget)
        if self.buckets[0] <= 0 or self.buckets[-1] < budget:
            raise ValueError(f"buckets {self.buckets} must be > 0 and reach "
                             f"max_tokens_per_step ({budget})")
        self.delayer = delayer if delayer is not None else make_delayer("on")
        self.tbo = tbo
        self.tbo_min_tokens = tbo_min_tokens if tbo_min_tokens is not None else crossover_min_tokens(dp)
        self.ranks = [RankScheduler(self.rank_config, r, eos_token_ids) for r in range(dp)]
        self.metrics = SchedulerMetrics(dp)
        self._done: list[Sequence] = []  # finished and counted, not yet returned
        self._tick = 0
        self._in_flight: StepPlan | None = None

    # -- requests --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> int:
        """Queue a new request on the rank that would then have the least prefill work: its
        pending prefill tokens plus the request's tokens not in that rank's prefix cache. So
        a request goes to the rank holding its longest cached prefix unless that rank's queued
        prefill exceeds another rank's by more than the cache saves (ties: longer cached
        prefix, lower KV usage, lower rank id). Pages another request on a rank is about to
        compute and this one would reuse (`shared_prefill_pages`: the n choices of a request)
        count as cached there while the rank has a free slot for each request waiting on it,
        this one included (so choices fill one rank's slots, then the next rank's), and their
        tokens leave that rank's pending work as this request sees it (it shares that work
        instead of queueing behind it). Returns the rank."""
        if self.get(seq.request_id) is not None:
            raise ValueError(f"request id {seq.request_id!r} is already live")
        cost, reuse = {}, {}
        for r in self.ranks:
            cached = len(r.cached_prefix(seq))
            room = r.slots.num_free > r.num_waiting
            shared = r.shared_prefill_pages(seq, cached, waiting_too=True) * r.config.page_tokens if room else 0
            reuse[r.rank] = cached * r.config.page_tokens + shared
            cost[r.rank] = r.pending_prefill_tokens - shared + seq.total_len - reuse[r.rank]
        rank = min(self.ranks, key=lambda r: (cost[r.rank], -reuse[r.rank], r.kv_usage, r.rank))
        seq.reuse_hint = reuse[rank.rank]
        seq.arrival_tick = self._tick
        rank.add(seq)
        self._collect_finished()  # a prompt that can never fit fails on add
        self._update_gauges()
        return rank.rank

    def get(self, request_id: str) -> Sequence | None:
        for r in self.ranks:
            seq = r.get(request_id)
            if seq is not None:
                return seq
        return None

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a live request (e.g. a stop string matched by the engine); None if not live."""
        for r in self.ranks:
            seq = r.finish(request_id, reason)
            if seq is not None:
                self._collect_finished()  # counted and gauged now, returned at the next step
                return seq
        return None

    def abort(self, request_id: str) -> Sequence | None:
        return self.finish(request_id, "abort")

    def fail(self, request_id: str) -> Sequence | None:
        return self.finish(request_id, "error")

    def forget_failed(self, plan: StepPlan) -> list[Sequence]:
        """`plan`'s step failed after `on_step_done` (overlap schedule): its pages leave the
        prefix cache, and the sequences that reused them since are recomputed
        (`RankScheduler.forget_failed`). -> those sequences; the caller fails `plan`'s own."""
        hit = [s for rank, work in zip(self.ranks, plan.per_rank) for s in rank.forget_failed(work)]
        self._update_gauges()
        return hit

    def has_work(self) -> bool:
        return any(r.has_work() for r in self.ranks)

    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in self.ranks)

    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self.ranks)

    # -- steps -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step for every rank. The engine runs it (unless `is_empty`) and then
        calls `on_step_done` with the sampled tokens."""
        if self._in_flight is not None and not self._in_flight.is_empty:
            raise RuntimeError("schedule() called twice without on_step_done()")
        decision = self.delayer.decide([r.outlook() for r in self.ranks])
        self.metrics.record_decision(decision)
        per_rank = [r.schedule(allow_prefill=decision.allow) for r in self.ranks]
        real = [sum(c.num_tokens for c in work) for work in per_rank]
        top = max(real)
        if top == 0:
            bucket, tbo, waste = 0, False, 0.0
        else:
            bucket = self.buckets[bisect.bisect_left(self.buckets, top)]
            tbo = self.use_tbo(bucket)
            waste = 1.0 - sum(real) / (self.dp * bucket)
        plan = StepPlan(self._tick, per_rank, bucket, tbo, real, waste, decision)
        self._tick += 1
        self._record(plan)
        self._in_flight = plan
        return plan

    def on_step_done(self, plan: StepPlan, sampled: dict) -> StepOutput:
        """`sampled` maps request_id -> token id for every chunk with `sample` set."""
        if plan is not self._in_flight:
            raise RuntimeError("on_step_done() got a plan that is not the last scheduled one")
        self._in_flight = None
        new_tokens = []
        for rank, work in zip(self.ranks, plan.per_rank):
            new_tokens += rank.on_step_done(work, sampled)
        self._update_gauges()  # full pages were registered (cached_pages)
        return StepOutput(new_tokens, self.pop_finished())

    def resolve(self, tokens) -> StepOutput:
        """Overlap schedule: the values of PENDING tokens, [(sequence, token id), ...] of the
        step before the one just planned. Runs the stop checks `on_step_done` skipped."""
        ranks, new_tokens = self.ranks, []
        for seq, tok in tokens:  # (per sequence per step: the host's hot path)
            tok = int(tok)
            if ranks[seq.rank].resolve(seq, tok):
                new_tokens.append((seq, tok))
        return StepOutput(new_tokens, self.pop_finished())

    def pop_finished(self) -> list[Sequence]:
        """Finished sequences not yet returned by on_step_done (e.g. after abort/fail)."""
        self._collect_finished()
        out, self._done = self._done, []
        return out

    def check_invariants(self) -> None:
        for r in self.ranks:
            r.check_invariants()

    def use_tbo(self, bucket: int) -> bool:
        """The engine's one two-batch-overlap decision (the compiled step only obeys it): a step
        of `bucket` tokens per rank runs as two micro-batches. The packer cuts the buffer at
        bucket // 2, so an odd or one-token bucket never splits."""
        if bucket < 2 or bucket % 2:
            return False
        if self.tbo is not None:
            return self.tbo
        return self.tbo_min_tokens is not None and bucket >= self.tbo_min_tokens

    # -- internals -------------------------------------------------------------------------
    def _record(self, plan: StepPlan) -> None:
        if plan.is_empty:
            self.metrics.record_step(None)
        else:
            prefill = decode = 0
            for work in plan.per_rank:
                for c in work:  # (ChunkWork.is_decode inlined: per chunk per step)
                    if c.num_tokens == 1 and c.start_pos >= len(c.seq.prompt_token_ids):
                        decode += 1
                    else:
                        prefill += c.num_tokens
            self.metrics.record_step(StepRecord(
                plan.step, plan.bucket, plan.tbo, sum(plan.real_tokens),
                self.dp * plan.bucket, plan.padding_waste, prefill, decode,
                plan.decision.outcome))
        self._update_gauges()

    def _collect_finished(self) -> None:
        """Count every sequence that finished (any reason) the moment it does, so the metrics
        never disagree with the ranks about what is running."""
        done = [s for r in self.ranks for s in r.pop_finished()]
        for s in done:
            self.metrics.finished[s.finish_reason] += 1
        if done:  # (nothing else moves the gauges between steps: `_record` updates them)
            self._done += done
            self._update_gauges()

    def rank_states(self) -> list[dict]:
        """Per rank: pages, slots, running / waiting counts and KV usage (plain numbers)."""
        return [{"rank": r.rank, "num_pages": r.pages.num_pages, "free_pages": r.pages.num_free,
                 "num_slots": r.slots.num_slots, "free_slots": r.slots.num_free,
                 "running": r.num_running, "waiting": r.num_waiting, "kv_usage": r.kv_usage,
                 "cached_pages": r.pages.num_cached, "cached_free_pages": r.pages.num_cached_free,
                 "state_pages": r.pages.states.size, "pages_with_state": len(r.pages.states.pages())}
                for r in self.ranks]

    def _update_gauges(self) -> None:
        m = self.metrics
        m.num_running = self.num_running
        m.num_waiting = self.num_waiting
        m.num_preemptions = sum(r.num_preemptions for r in self.ranks)
        m.prefix_cache = {name: sum(getattr(r.prefix_stats, name) for r in self.ranks)
                          for name in _PREFIX_STATS}
        m.prefix_cache["cached_pages"] = sum(r.pages.num_cached for r in self.ranks)
        m.prefix_cache["evictions"] = sum(r.pages.num_evictions for r in self.ranks)
        m.prefix_cache["state_evictions"] = sum(r.pages.states.num_evictions for r in self.ranks)
