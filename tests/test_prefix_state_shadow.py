"""The prefix cache's host bookkeeping against what the device really holds.

A RankScheduler is driven as the engine drives it (overlap schedule: step N+1 is planned and
dispatched before step N's tokens are read; a step may fail once the next one is dispatched),
and every plan is executed, in dispatch order, on a shadow of the device: for each KV page
position, slot ring row and window-state entry row, the token prefix whose value it holds (and
the step that wrote it). Every read a step makes is checked against the prefix it should see:
a restore reads the window state of the pages before its start (`restore_states`), a chunk
reads its slot's ring and its pages' earlier positions; writes follow `ChunkWork.token_states`
(each page's last rows, as `cached_attention._page_rows`), restores first as in `ModelRunner.run`.
A failed step's writes (and the next step's by the requests it takes down) become unreadable.
Sampled tokens are a function of the prefix, so the outputs are also checked token for token."""

from __future__ import annotations

import numpy as np
import pytest

from atom_jax.scheduler import PENDING, RankConfig, RankScheduler, SamplingParams, Sequence

VOCAB = 40


def _h(tokens) -> int:
    return hash(tuple(tokens))


def _sample(prefix) -> int:  # the "model": a token determined by the whole prefix (0 = EOS)
    return _h(prefix) % VOCAB


class _Shadow:
    """What the device holds: (page, offset), (slot, pos % W) and (entry, offset) -> (value,
    step); checked reads, recorded writes."""

    def __init__(self, page_tokens: int, window: int, window_pages: int, ratio: int):
        self.pt, self.w, self.wp = page_tokens, window, window_pages
        self.kept = max(min(window, page_tokens), ratio)  # an entry keeps its page's last rows
        self.kv, self.ring, self.entry = {}, {}, {}
        self.writes: dict[int, list] = {}  # step -> [(request id, store, key, value)]
        self.last_sampled: dict[str, int] = {}
        self.errors: list = []
        self.restored = 0

    def _bad(self, step, c, what):
        self.errors.append(f"step {step}, {c.request_id} (start {c.start_pos}): {what}")

    def execute(self, work, step: int) -> dict:
        pt, w = self.pt, self.w
        tokens = {}
        for c in work:  # the known tokens, a PENDING one as the device has it
            fed = [self.last_sampled[c.request_id] if t == PENDING else t for t in c.token_ids()]
            tokens[c.request_id] = c.seq.token_ids(0, c.start_pos) + fed
        for c in work:  # restores run before the step
            if c.restore:
                self.restored += 1
                toks = tokens[c.request_id]
                for q in range(max(0, c.start_pos - w), c.start_pos):
                    e = c.restore_states[self.wp - (c.start_pos // pt - q // pt)]
                    if e < 0 or self.entry.get((e, q % pt), (None,))[0] != _h(toks[:q + 1]):
                        self._bad(step, c, f"restore of position {q} from state entry {e}")
                    self.ring[(c.seq.slot, q % w)] = ((q, _h(toks[:q + 1])), step)
        for c in work:  # what each chunk reads
            toks, seq = tokens[c.request_id], c.seq
            for q in range(max(0, c.start_pos - w), c.start_pos):
                if self.ring.get((seq.slot, q % w), (None,))[0] != (q, _h(toks[:q + 1])):
                    self._bad(step, c, f"slot ring row of position {q}")
            for q in range(c.start_pos):
                if self.kv.get((seq.pages[q // pt], q % pt), (None,))[0] != _h(toks[:q + 1]):
                    self._bad(step, c, f"page {seq.pages[q // pt]} at position {q}")
                    break
        out, log, entry_page, page_writer = {}, [], {}, {}
        for c in work:  # what it writes
            toks, seq = tokens[c.request_id], c.seq
            states = c.token_states(pt)
            for j, p in enumerate(range(c.start_pos, c.start_pos + c.num_tokens)):
                h, page = _h(toks[:p + 1]), seq.pages[p // pt]
                if page_writer.setdefault(page, c.request_id) != c.request_id:
                    self._bad(step, c, f"page {page} written by two requests in one step")
                writes = [(self.kv, (page, p % pt), (h, step)), (self.ring, (seq.slot, p % w), ((p, h), step))]
                e = states[j] if states else -1
                if e >= 0 and p % pt >= pt - self.kept:
                    if entry_page.setdefault(e, page) != page:
                        self._bad(step, c, f"state entry {e} written for two pages in one step")
                    writes.append((self.entry, (e, p % pt), (h, step)))
                for store, key, value in writes:
                    store[key] = value
                    log.append((c.request_id, store, key, value))
            if c.sample:
                out[c.request_id] = _sample(toks[:c.start_pos + c.num_tokens])
        self.writes[step] = log
        return out

    def fail(self, step: int, rids_of_next: set) -> None:
        """Step `step` failed: its writes, and those of step + 1 by `rids_of_next`, hold nothing."""
        for s, only in ((step, None), (step + 1, rids_of_next)):
            for rid, store, key, value in self.writes.get(s, ()):
                if (only is None or rid in only) and store.get(key) == value:
                    store[key] = (("garbage", s),)


def _run(rng, *, page_tokens, window, ratio, state_pages, overlap, fail_rate, ticks=300):
    window_pages = -(-window // page_tokens)
    cfg = RankConfig(num_slots=3, num_pages=12, page_tokens=page_tokens, max_tokens_per_step=12, chunk_size=6,
                     prefix_state_pages=state_pages, window_pages=window_pages)
    sched = RankScheduler(cfg, eos_token_ids=(0,))
    dev = _Shadow(page_tokens, window, window_pages, ratio)
    stems = [list(map(int, rng.integers(1, VOCAB, 20))) for _ in range(3)]
    seqs, prev, step, failures = {}, None, 0, 0

    def tick(fail_rate):
        nonlocal prev, step, failures
        plan = sched.schedule()
        step += 1
        sampled = dev.execute(plan, step) if plan else {}
        if not overlap:
            sched.on_step_done(plan, sampled)
        else:
            if prev is not None and rng.random() < fail_rate:  # as Engine._fail, once step N+1 is out
                failures += 1
                down = {c.request_id for c in prev[0]} | {s.request_id for s in sched.forget_failed(prev[0])}
                for c in prev[0]:
                    sched.fail(c.request_id)
                dev.fail(step - 1, down)
            elif prev is not None:
                for c in prev[0]:
                    if c.sample:
                        sched.resolve(c.seq, prev[1][c.request_id])
            dev.last_sampled.update(sampled)
            sched.on_step_done(plan, {rid: PENDING for rid in sampled})
            prev = (plan, sampled) if plan else None
        dev.writes.pop(step - 2, None)
        sched.check_invariants()

    for _ in range(ticks):
        if len(seqs) < 80 and rng.random() < 0.5:
            done = [s for s in seqs.values() if s.finish_reason in ("length", "stop") and s.total_len < 30]
            if done and rng.random() < 0.4:  # the next turn of a finished conversation
                s0 = done[rng.integers(len(done))]
                prompt = s0.prompt_token_ids + s0.output_token_ids
            else:
                prompt = stems[rng.integers(3)][:rng.integers(1, 21)]
            prompt = list(prompt) + list(map(int, rng.integers(1, VOCAB, rng.integers(0, 6))))
            seq = Sequence(f"r{len(seqs)}", prompt, SamplingParams(max_tokens=int(rng.integers(1, 14))))
            seqs[seq.request_id] = seq
            sched.add(seq)
        live = [rid for rid, s in seqs.items() if not s.is_finished]
        if live and rng.random() < 0.08:
            sched.abort(live[rng.integers(len(live))])
        tick(fail_rate)
    while sched.has_work() or prev is not None:
        tick(0.0)
    for rid, s in seqs.items():  # outputs: the model's, token for token
        if s.finish_reason in ("length", "stop"):
            toks = list(s.prompt_token_ids)
            for o in s.output_token_ids:
                if o != _sample(toks):
                    dev.errors.append(f"{rid}: output {len(toks) - s.num_prompt_tokens} is not the model's")
                    break
                toks.append(o)
    return dev, sched, failures


@pytest.mark.parametrize("window,state_pages,overlap,fail_rate", [
    (4, 4, True, 0.1),   # window_pages 1
    (8, 3, True, 0.1),   # window_pages 2: a restore reads two pages' state
    (4, 3, False, 0.0),  # the synchronous loop
])
def test_every_device_read_sees_what_the_host_bookkeeping_says(window, state_pages, overlap, fail_rate):
    restored = evictions = preemptions = failed = 0
    for _ in range(4):
        seed = int(np.random.default_rng().integers(2**31))
        dev, sched, failures = _run(np.random.default_rng(seed), page_tokens=4, window=window, ratio=2,
                                    state_pages=state_pages, overlap=overlap, fail_rate=fail_rate)
        assert not dev.errors, (seed, dev.errors[:5])
        assert sched.pages.num_used == 0, seed
        restored, evictions = restored + dev.restored, evictions + sched.pages.states.num_evictions
        preemptions, failed = preemptions + sched.num_preemptions, failed + failures
    # the runs exercised what they check: restores, state entries recycled, preemption, failures
    assert restored and evictions and preemptions and (failed > 0) == (fail_rate > 0)
