"""Continuous batching for one DP rank: decode first, then chunked prefill, under a token budget.

Memory policy (decided here, documented for the engine):
- Admission needs a free slot and free pages for the sequence's first chunk; pages are then
  extended chunk by chunk and token by token.
- When a running sequence cannot get a page, the newest running sequence is preempted
  (recompute: its slot and pages are freed, it goes back to the front of the waiting queue
  and later re-prefills prompt + output). The oldest sequence is therefore never preempted,
  so it always progresses: no livelock. Overlap schedule: a sequence whose pending token ends
  it by length is no victim (it gets no more steps and its pages are freed when the token
  resolves, one step later); while only such sequences hold the pages, the one asking waits.
- A sequence that cannot get a page while it is the only one running can never fit in this
  rank's cache: it fails with finish_reason "error". A prompt whose pages exceed the whole
  cache, or longer than `max_seq_len`, fails the same way as soon as it is added.
- A sequence reaching `max_seq_len` tokens (prompt + output) finishes with "length", as
  vLLM does at max_model_len.

Prefix caching (`enable_prefix_caching`): admission looks the sequence's full token blocks up
in the rank's page cache (`PageAllocator.match`), holds the longest cached run of pages and
starts the first chunk after it (at least one token is always computed, for the logits); the
chunk carries `restore=True`, so the runner first rebuilds the slot's per-sequence state at
that position from the state stored with the pages. Every page a step fills completely is
registered when the step is done. Finished and preempted sequences drop their references;
cached pages nobody holds are evicted least recently used first when pages run out. A
waiting sequence whose next pages a running prefill here is computing is passed over until
they are registered (`shared_prefill_pages`), so requests sharing a prefix in flight compute
it once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from atom_jax.scheduler.pages import PageAllocator, SlotAllocator
from atom_jax.scheduler.sequence import PENDING, Sequence, SeqStatus


@dataclasses.dataclass(frozen=True)
class RankConfig:
    num_slots: int = 64            # max running sequences (fixed per-sequence state slots)
    num_pages: int = 2048          # KV pages in this rank's cache
    page_tokens: int = 128         # tokens per page
    max_tokens_per_step: int = 2048  # real tokens this rank may feed in one step
    chunk_size: int = 2048         # max prefill tokens of one sequence in one step
    # Longest sequence (prompt + output) the model's page table can address
    # (page_tokens * max_pages_per_seq of the cache layout); None = only the cache limits it.
    max_seq_len: int | None = None
    enable_prefix_caching: bool = True  # reuse cached full pages of equal token prefixes
    # pages whose window state the prefix cache keeps at once (None: every page), and how many
    # pages the sliding window spans (a restore reads the state of that many pages)
    prefix_state_pages: int | None = None
    window_pages: int = 1

    def validate(self) -> "RankConfig":
        for name in ("num_slots", "num_pages", "page_tokens", "max_tokens_per_step",
                     "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RankConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ValueError(f"RankConfig.max_seq_len must be > 0, got {self.max_seq_len}")
        # Every running decode gets its token each step, so the budget must cover all slots.
        if self.max_tokens_per_step < self.num_slots:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= "
                             f"num_slots ({self.num_slots}) so every decode fits in a step")
        return self


@dataclasses.dataclass(slots=True)
class ChunkWork:
    """Feed tokens [start_pos, start_pos + num_tokens) of `seq`; sample after the last one
    when `sample` (the chunk reaches the end of the known tokens). Read only once planned (not
    frozen: one is built per running sequence per step, and a frozen dataclass's __init__
    costs about 3x as much)."""

    seq: Sequence
    start_pos: int
    num_tokens: int
    sample: bool
    # the sequence was just admitted onto cached pages: restore its slot's state (sliding
    # window ring, compressor tails) at start_pos from the pages before running the chunk
    restore: bool = False
    # prefix caching: the state entry of each page the chunk writes (first: the page holding
    # start_pos) and, with `restore`, of the window_pages pages before start_pos (-1: none)
    page_states: tuple = ()
    restore_states: tuple = ()
    # (page, key) of the pages `on_step_done` offered to the prefix cache once this chunk was
    # dispatched: what `forget_failed` takes back if its step fails after all (overlap schedule)
    registered: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def token_states(self, page_tokens: int):
        """The state entry of each token's page, or None when no page keeps state."""
        if not self.page_states:
            return None
        if self.num_tokens == 1:  # a decode (the host's hot path)
            return [self.page_states[0]]
        out, pos, end = [], self.start_pos, self.start_pos + self.num_tokens
        for entry in self.page_states:  # one run of tokens per page (the host's hot path)
            nxt = min(end, (pos // page_tokens + 1) * page_tokens)
            out += [entry] * (nxt - pos)
            pos = nxt
        return out

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start_pos >= self.seq.num_prompt_tokens

    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start_pos, self.num_tokens)


@dataclasses.dataclass(frozen=True)
class PrefillOutlook:
    """What a rank would do with prefill this tick if allowed (input to the delayer)."""

    prefillable: bool   # would admit or continue at least one prefill
    ready_tokens: int   # prefill tokens it would feed this tick
    num_decodes: int    # running decode sequences (each feeds one token)
    kv_usage: float     # fraction of pages in use
    token_budget: int = 0  # the rank's max_tokens_per_step


# Whether requests wait for pages another request is computing (`shared_prefill_pages`). False:
# each computes what is not cached when it is admitted (the policy before; for A/B runs:
# `scripts/gpu/with_attrs.py scheduler.rank_scheduler.SHARE_PREFILL_IN_FLIGHT=False -- prefix ...`).
SHARE_PREFILL_IN_FLIGHT = True


@dataclasses.dataclass
class PrefixCacheStats:
    """Prefix-cache lookups of one rank, one per admission (re-admissions after preemption too)."""

    queries: int = 0         # admissions that looked the cache up
    hits: int = 0            # of those, admissions that reused at least one page
    queried_tokens: int = 0  # tokens to compute at those admissions without the cache
    hit_tokens: int = 0      # tokens reused instead


class RankScheduler:
    def __init__(self, config: RankConfig, rank: int = 0, eos_token_ids=()):
        self.config = config.validate()
        self.rank = rank
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pages = PageAllocator(config.num_pages, config.page_tokens, config.enable_prefix_caching,
                                   config.prefix_state_pages, config.window_pages)
        self.prefix_stats = PrefixCacheStats()
        self.slots = SlotAllocator(config.num_slots)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._waiting_prefill = 0  # sum of `_waiting_work` over `waiting` (kept, not recounted per add)
        self.running: list[Sequence] = []  # admission order: oldest first
        self._live: dict[str, Sequence] = {}
        self._finished: list[Sequence] = []  # finished since the last pop_finished()
        self._in_flight: list[ChunkWork] | None = None
        self._work: dict[str, ChunkWork] | None = None  # only set inside schedule()
        self._budget = 0
        self.num_preemptions = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.pages.usage

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def get(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens not yet in the cache: used to place new requests (a
        waiting sequence counts what it was placed expecting to compute, `reuse_hint`)."""
        return self._waiting_prefill + sum(s.remaining_prefill_tokens for s in self.running)

    @staticmethod
    def _waiting_work(seq: Sequence) -> int:
        return max(seq.num_uncomputed - seq.reuse_hint, 0)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Pages of `seq`'s longest cached prefix on this rank (read only). At least the last
        known token is left to compute: a step must produce its logits."""
        if not self.pages.prefix_caching:
            return []
        pt = self.config.page_tokens
        return self.pages.match(seq.iter_block_keys(pt, (seq.total_len - 1) // pt))

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        return len(self.cached_prefix(seq)) * self.config.page_tokens

    def shared_prefill_pages(self, seq: Sequence, first: int, waiting_too: bool = False) -> int:
        """Pages of `seq` from page `first` on (the pages before are cached) that another live
        sequence on this rank has yet to compute and will register: the longest run of block
        keys `seq` shares from there with a running sequence still prefilling (`waiting_too`:
        or a waiting one, which placement counts). So n choices of one prompt, or requests
        with one long system prompt arriving together, compute their shared pages once."""
        if not (self.pages.prefix_caching and SHARE_PREFILL_IN_FLIGHT):
            return 0
        pt = self.config.page_tokens
        limit = (seq.total_len - 1) // pt  # as `cached_prefix`: the last known token is computed
        if first >= limit:
            return 0
        others = [s for s in self.running if s.is_prefilling]
        if waiting_too:
            others += [s for s in self.waiting if s is not seq]
        best = 0
        for other in others:
            if other.num_computed >= (first + 1) * pt:  # computed that page already: not shared
                continue
            ends = min(limit, other.total_len // pt)  # the full pages its prefill will register
            mine = itertools.islice(seq.iter_block_keys(pt, ends), first, None)
            theirs = itertools.islice(other.iter_block_keys(pt, ends), first, None)
            run = 0
            for a, b in zip(mine, theirs):  # chained keys: equal means the whole prefix is equal
                if a != b:
                    break
                run += 1
            best = max(best, run)
        return best

    # -- requests --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already live on rank {self.rank}")
        if seq.status is not SeqStatus.WAITING or seq.num_computed or seq.pages:
            raise ValueError(f"{seq!r} is not a fresh waiting sequence")
        seq.rank = self.rank
        self._live[seq.request_id] = seq
        self.waiting.append(seq)
        self._waiting_prefill += self._waiting_work(seq)
        too_long = self.config.max_seq_len is not None and seq.total_len > self.config.max_seq_len
        if too_long or self.pages.pages_for(seq.total_len) > self.pages.num_pages:
            self._release(seq, "error")  # the prompt alone can never be cached

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a live request now (any state) and free everything it holds.
        Returns the sequence, or None if it is not live here (unknown or already finished)."""
        seq = self._live.get(request_id)
        if seq is not None:
            self._release(seq, reason)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        return self.finish(request_id, "abort")

    def fail(self, request_id: str) -> Sequence | None:
        return self.finish(request_id, "error")

    def pop_finished(self) -> list[Sequence]:
        out, self._finished = self._finished, []
        return out

    # -- one step --------------------------------------------------------------------------
    def outlook(self) -> PrefillOutlook:
        """Dry run of the prefill part of `schedule` (no allocation), for the delayer."""
        cfg = self.config
        decodes, prefilling = [], []
        for s in self.running:
            if s.is_prefilling:
                prefilling.append(s)
            elif not self._done_when_resolved(s):
                decodes.append(s)
        left = cfg.max_tokens_per_step - len(decodes)
        ready = 0
        for s in prefilling:
            if left <= 0:
                break
            n = min(cfg.chunk_size, s.num_uncomputed, left)
            ready, left = ready + n, left - n
        free_slots = self.slots.num_free
        if self.waiting and left > 0 and free_slots:  # (the pages decodes need: only then)
            free_pages = self.pages.num_free - sum(
                self.pages.extra_pages(s.pages, s.total_len) for s in decodes)
        for s in self.waiting:
            if left <= 0 or free_slots == 0:
                break
            hit = self.cached_prefix_tokens(s)  # the delayer sees only the uncached work
            n = min(cfg.chunk_size, s.total_len - hit, left)
            need = self.pages.pages_for(hit + n)  # (cached pages counted as taken: a bound)
            if need > free_pages:
                break
            ready, left = ready + n, left - n
            free_slots, free_pages = free_slots - 1, free_pages - need
        return PrefillOutlook(ready > 0, ready, len(decodes), self.kv_usage,
                              cfg.max_tokens_per_step)

    def schedule(self, allow_prefill: bool = True) -> list[ChunkWork]:
        """Plan this rank's work for one step. Call `on_step_done` before the next schedule."""
        if self._in_flight:
            raise RuntimeError(f"rank {self.rank}: schedule() called twice without on_step_done()")
        cfg = self.config
        self._work = {}
        self._budget = cfg.max_tokens_per_step

        # 1. Decodes first: every running decode sequence gets its one token (not one whose
        # pending token ends it by length: that step's token would be dropped).
        prefilling = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:  # preempted meanwhile
                continue
            if seq.is_prefilling:
                prefilling.append(seq)
            elif self._done_when_resolved(seq):
                continue
            elif self._reserve(seq, seq.total_len):
                self._put(seq, seq.num_computed, 1, True)

        if allow_prefill:
            # 2. Continue prefills already holding a slot (oldest first).
            for seq in prefilling:
                if self._budget <= 0:
                    break
                if seq.status is SeqStatus.RUNNING:  # (a decode's pages may have preempted it)
                    n = min(cfg.chunk_size, seq.num_uncomputed, self._budget)
                    if self._reserve(seq, seq.num_computed + n):
                        self._put(seq, seq.num_computed, n, seq.num_computed + n == seq.total_len)
            # 3. Admit waiting sequences in arrival order, passing over those whose next pages a
            # running prefill is computing (`shared_prefill_pages`: they wait to reuse them; it
            # runs every step, so they wait a bounded time); the first that does not fit stops it.
            for seq in list(self.waiting):
                if self._budget <= 0 or not self.slots.num_free:
                    break
                hit = self.cached_prefix(seq)
                if self.shared_prefill_pages(seq, len(hit)):
                    continue
                if not self._admit(seq, hit):
                    break

        # Keep the engine's view stable: running order (oldest first).
        planned = self._work
        work = [planned[s.request_id] for s in self.running if s.request_id in planned]
        self._in_flight = work
        self._work = None
        return work

    def on_step_done(self, work: list[ChunkWork], sampled: dict) -> list[tuple[Sequence, int]]:
        """Mark the step's KV as cached and append sampled tokens. Sequences finished while the
        step ran (abort), or sent back to the queue (`forget_failed`), are skipped. Returns (sequence, token) for every appended token."""
        if work is not self._in_flight and work != self._in_flight:
            raise RuntimeError(f"rank {self.rank}: on_step_done() got a plan that is not the "
                               "one last returned by schedule()")
        self._in_flight = None
        out = []
        for c in work:
            seq = c.seq
            if seq.status is not SeqStatus.RUNNING:  # finished, or requeued (`forget_failed`)
                continue
            assert seq.num_computed == c.start_pos, (seq, c)
            seq.num_computed = c.start_pos + c.num_tokens
            self._register_full_pages(seq, c.registered)
            if c.sample:
                if seq.request_id not in sampled:
                    raise KeyError(f"no sampled token for request {seq.request_id!r} "
                                   f"(rank {self.rank}), whose chunk asked for a sample")
                tok = int(sampled[seq.request_id])
                self.on_tokens(seq, tok)
                out.append((seq, tok))
        return out

    def on_tokens(self, seq: Sequence, token_id: int) -> bool:
        """Append a sampled token; finish on a stop id or max_tokens. True if it finished.
        A PENDING token is appended unchecked: `resolve` checks it once its value is known (so
        a sequence may run one step past its end; that step's token is dropped)."""
        seq.output_token_ids.append(token_id)
        return token_id != PENDING and self._check_stop(seq, token_id)

    def resolve(self, seq: Sequence, token_id: int) -> bool:
        """The value of `seq`'s PENDING token; finish as `on_tokens` would. False (and nothing
        changes) if the sequence has no pending token (it finished meanwhile, e.g. aborted)."""
        out = seq.output_token_ids  # (has_pending and is_finished inlined: per sequence per step)
        if seq.status is SeqStatus.FINISHED or not out or out[-1] != PENDING:
            return False
        out[-1] = token_id
        self._check_stop(seq, token_id)
        return True

    def _check_stop(self, seq: Sequence, token_id: int) -> bool:
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            self._release(seq, "stop")
        elif self._at_length(seq):
            self._release(seq, "length")
        return seq.is_finished

    def _at_length(self, seq: Sequence) -> bool:
        """`seq` has all the tokens it may have (max_tokens, or the context limit)."""
        n_out = len(seq.output_token_ids)  # (lengths inlined: asked per sequence per step)
        if n_out >= seq.params.max_tokens:
            return True
        limit = self.config.max_seq_len
        return limit is not None and len(seq.prompt_token_ids) + n_out >= limit

    def _done_when_resolved(self, seq: Sequence) -> bool:
        """Overlap schedule: `seq`'s newest token is still on the device and ends it whatever its
        value (length): it gets no more steps, only `resolve` (which finishes it). Planning its
        decode would run a whole step for a token that is dropped: for a lone request, a step
        between its first token and the next request's prefill."""
        out = seq.output_token_ids  # (has_pending inlined: asked twice per sequence per step)
        return bool(out) and out[-1] == PENDING and self._at_length(seq)

    # -- internals -------------------------------------------------------------------------
    def _admit(self, seq: Sequence, hit: list[int]) -> bool:
        """Admit a waiting sequence onto its cached prefix (`hit`, its `cached_prefix`) plus
        fresh pages for its first chunk; False (nothing changed) if the pages are not there."""
        pt = self.config.page_tokens
        start = len(hit) * pt
        n = min(self.config.chunk_size, seq.total_len - start, self._budget)
        if self.pages.pages_for(start + n) - len(hit) > self.pages.num_free_after_acquire(hit):
            return False
        if self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            self.waiting.remove(seq)
        self._waiting_prefill -= self._waiting_work(seq)
        seq.slot = self.slots.allocate()
        seq.pages = self.pages.acquire(hit)
        # the window state the restore reads, before `extend` may give its entries to new pages
        # (the restore runs before the step writes them), oldest first, -1 before position 0
        w = self.pages.window_pages
        back = (-1,) * max(0, w - len(hit)) + tuple(self.pages.states.entry(p) for p in hit[-w:])
        self.pages.extend(seq.pages, start + n)
        seq.num_computed = start
        seq.num_registered_pages = seq.num_reused_pages = len(hit)
        if self.pages.prefix_caching:
            st = self.prefix_stats
            st.queries += 1
            st.hits += bool(hit)
            st.queried_tokens += seq.total_len
            st.hit_tokens += start
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(start, seq.num_prompt_tokens)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._put(seq, start, n, start + n == seq.total_len, restore=start > 0,
                  restore_states=back if hit else ())
        return True

    def _register_full_pages(self, seq: Sequence, registered: list) -> None:
        """Offer the pages this sequence has filled completely to the prefix cache (each
        (page, key) offered is appended to `registered`)."""
        full = seq.num_computed // self.config.page_tokens
        if self.pages.prefix_caching and full > seq.num_registered_pages:
            keys = seq.block_keys(self.config.page_tokens, full)
            for k in range(seq.num_registered_pages, full):
                self.pages.register(seq.pages[k], keys[k])
                registered.append((seq.pages[k], keys[k]))
            seq.num_registered_pages = full

    def forget_failed(self, work: list[ChunkWork]) -> list[Sequence]:
        """The step that ran `work` failed after `on_step_done` (overlap schedule): the pages its
        chunks offered to the prefix cache hold no KV. They leave the cache, and a live sequence
        that reused one since (admitted onto it by the step planned meanwhile: its KV read it) is
        recomputed: its references and slot dropped, back to the front of the waiting queue (its
        chunk in that step is then ignored); re-admitted, it reuses only pages still cached.
        -> those sequences (the caller fails `work`'s own: they were in the failed step)."""
        bad = {page for c in work for page, key in c.registered if self.pages.unregister(page, key)}
        own = {id(c.seq) for c in work}
        hit = [s for s in self.running if id(s) not in own and not bad.isdisjoint(s.pages)]
        for s in reversed(hit):  # (appendleft: they keep their order at the queue's front)
            self._requeue(s)
            s.num_cached_tokens = None  # what its first admission reused was not there
        return hit

    def _put(self, seq: Sequence, start: int, n: int, sample: bool, restore: bool = False,
             restore_states: tuple = ()) -> None:
        """Plan the chunk [start, start + n) of `seq` (built once: the host's hot path, one per
        running sequence per step)."""
        page_states = ()
        states = self.pages.states
        if states.size:  # where the chunk's pages keep their window state
            pt = self.config.page_tokens
            page_states = tuple(map(states.entry, seq.pages[start // pt: (start + n - 1) // pt + 1]))
        self._work[seq.request_id] = ChunkWork(seq, start, n, sample, restore, page_states, restore_states)
        self._budget -= n

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` tokens, preempting the newest running sequences
        if needed. False if `seq` itself was preempted or failed, or has to wait a step.
        A sequence whose pending token ends it (`_done_when_resolved`) is never a victim:
        recomputing it would be for nothing, and its pages are freed when the token resolves;
        while only such sequences hold the pages `seq` needs, `seq` waits a step."""
        if len(seq.pages) * self.config.page_tokens >= num_tokens:
            return True  # most decodes: the last page has room
        while not self.pages.extend(seq.pages, num_tokens, own_from=seq.num_reused_pages):
            victim = next(s for s in reversed(self.running) if s is seq or not self._done_when_resolved(s))
            if victim is seq and all(s is seq or self._done_when_resolved(s) for s in self.running):
                if self.running == [seq]:
                    self._release(seq, "error")  # alone and still too big: can never fit
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        chunk = self._work.pop(seq.request_id, None)
        if chunk is not None:
            self._budget += chunk.num_tokens
        self._requeue(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        """Recompute: free a running sequence's slot and pages, put it first in the queue."""
        self._free_resources(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_registered_pages = 0
        seq.reuse_hint = 0  # (its recompute: placed long ago)
        self.waiting.appendleft(seq)  # preempted work goes first when memory returns
        self._waiting_prefill += self._waiting_work(seq)

    def _free_resources(self, seq: Sequence) -> None:
        if seq.pages:
            self.pages.free(seq.pages)
            seq.pages = []
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def _release(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            self._waiting_prefill -= self._waiting_work(seq)
        if self._work is not None:  # failing inside schedule(): drop its chunk
            chunk = self._work.pop(seq.request_id, None)
            if chunk is not None:
                self._budget += chunk.num_tokens
        self._free_resources(seq)
        if seq.has_pending:  # finished before its last token was read (abort, failure): drop it
            seq.output_token_ids.pop()
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._live[seq.request_id]
        self._finished.append(seq)

    def check_invariants(self) -> None:
        """Cross-check bookkeeping (tests and debug runs)."""
        refs = collections.Counter(p for s in self.running for p in s.pages)
        for s in self.running:
            assert len(set(s.pages)) == len(s.pages), f"{s!r} holds a page twice"
        assert all(self.pages.refcount(p) == n for p, n in refs.items()), "page reference counts"
        assert len(refs) == self.pages.num_used, (len(refs), self.pages.num_used)
        self.pages.check()
        held_slots = [s.slot for s in self.running]
        assert None not in held_slots and len(set(held_slots)) == len(held_slots)
        assert len(held_slots) == self.slots.num_slots - self.slots.num_free
        for s in self.waiting:
            assert s.status is SeqStatus.WAITING and not s.pages and s.slot is None, s
        for s in self.running:
            assert s.status is SeqStatus.RUNNING, s
            assert self.pages.pages_for(s.num_computed) <= len(s.pages), s
        assert len(self._live) == len(self.running) + len(self.waiting)
        assert self._waiting_prefill == sum(map(self._waiting_work, self.waiting)), self._waiting_prefill
