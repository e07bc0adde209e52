"""ModelRunner: owns the parameters on the mesh, the per-rank caches and the compiled steps;
turns a scheduler StepPlan into packed buffers, runs one step and samples on device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.engine.sampler import sample_tokens
from atom_jax.sharding import DP, StepOptions
from atom_jax.sharding.cached_step import make_cached_step, make_restore
from atom_jax.sharding.placement import place, shard_params


@dataclasses.dataclass
class SamplingRows:
    """Per sampled sequence: its logits row (rank * num_slots + index among the rank's
    sampling chunks) and its sampling parameters, in the dtypes the sampler takes."""

    rows: np.ndarray  # [n] int32
    temperature: np.ndarray  # [n] float32
    top_k: np.ndarray  # [n] int32
    top_p: np.ndarray  # [n] float32
    seed: np.ndarray  # [n] uint32
    counter: np.ndarray  # [n] uint32 (output tokens so far)


@dataclasses.dataclass
class StepInputs:
    """Everything the host decides for one step: the same on every process of a multi-host
    run (the scheduler's process builds it, `atom_jax.distributed` ships it to the others)."""

    bucket: int
    tbo: bool
    chunks: list  # per rank: [(slot, start_pos, token_ids int32 array, sample bool)]
    page_rows: list  # [(rank, slot, pages int32 array)]: page-table rows to (re)write
    sampling: SamplingRows
    # [(rank, slot, start_pos)]: slots admitted onto cached pages; their state is rebuilt
    # at start_pos from the pages before the step runs (prefix caching)
    restores: list = dataclasses.field(default_factory=list)


class ModelRunner:
    """The device side of the engine. One step is `run(host_inputs(plan))`: `host_inputs` is
    numpy only (what a multi-host leader broadcasts), `run` is what every process executes."""

    def __init__(self, model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions()):
        self.model, self.mesh, self.layout = model, mesh, layout
        self.dp = mesh.shape[DP]
        self.cfg = model.cfg
        # one jitted step; it compiles once per (bucket, tbo)
        self._step, _ = make_cached_step(model, mesh, layout, opts)
        self._compiled = {}  # (bucket, tbo) -> executable built ahead by `precompile`
        # the same specs make_cached_step compiled against (param_specs of this expert mode)
        self.params = shard_params(nnx.split(model)[1].to_pure_dict(), mesh, opts.expert_mode)
        shard = self._dp_sharding = NamedSharding(mesh, P(DP))
        one = init_cache(self.cfg, layout, model.dtype)
        self.cache = jax.tree.map(lambda a: place(jnp.broadcast_to(a, (self.dp,) + a.shape), shard), one)
        self.page_table = np.zeros((self.dp, layout.num_slots, layout.max_pages_per_seq), np.int32)
        self._restore = make_restore(mesh, layout) if layout.page_state else None
        # tokens come back replicated, so every process (the scheduler's too) can read them
        self._sample = jax.jit(_gather_sample, out_shardings=NamedSharding(mesh, P()))

    def host_inputs(self, plan) -> StepInputs:
        """The host side of a step (numpy only, no device work): what every process of a
        multi-host run needs to execute it. Sampling rows follow `plan.sampled()`; each
        sequence's parameters (its seed resolved when it was added) come from `seq.params`.
        Page-table rows are sent only when they differ from the table as it stands."""
        chunks, page_rows, rows, params, counters, restores = [], [], [], [], [], []
        for r, work in enumerate(plan.per_rank):
            rank_chunks, j = [], 0
            for w in work:
                seq = w.seq
                pages = np.asarray(seq.pages, np.int32)
                row = self.page_table[r, seq.slot]
                if np.any(row[: len(pages)] != pages) or np.any(row[len(pages):]):
                    page_rows.append((r, seq.slot, pages))
                rank_chunks.append((seq.slot, w.start_pos, np.asarray(w.token_ids(), np.int32), bool(w.sample)))
                if w.restore:
                    restores.append((r, seq.slot, w.start_pos))
                if w.sample:
                    rows.append(r * self.layout.num_slots + j)
                    params.append(seq.params)
                    counters.append(len(seq.output_token_ids))
                    j += 1
            chunks.append(rank_chunks)
        sampling = SamplingRows(
            rows=np.asarray(rows, np.int32).reshape(-1),
            temperature=np.asarray([p.temperature for p in params], np.float32).reshape(-1),
            top_k=np.asarray([p.top_k for p in params], np.int32).reshape(-1),
            top_p=np.asarray([p.top_p for p in params], np.float32).reshape(-1),
            seed=np.asarray([p.seed % 2**32 for p in params], np.uint32).reshape(-1),
            counter=np.asarray(counters, np.uint32).reshape(-1))
        return StepInputs(plan.bucket, bool(plan.tbo), chunks, page_rows, sampling, restores)

    def run(self, inputs: StepInputs) -> tuple[np.ndarray, np.ndarray]:
        """The device side of a step; every process of a multi-host run calls it with the same
        inputs. -> (tokens, logprobs) of the sampling rows, on every process."""
        for r, slot, pages in inputs.page_rows:
            self.page_table[r, slot] = 0
            self.page_table[r, slot, : len(pages)] = pages
        if inputs.restores:
            self.restore_slots(inputs.restores)
        per_rank = [pack_chunks(c, inputs.bucket, self.layout.num_slots, split=inputs.tbo) for c in inputs.chunks]
        batch = {k: self.global_array(np.stack([b.arrays()[k] for b in per_rank])) for k in per_rank[0].arrays()}
        page_table = self.global_array(self.page_table)
        built = self._compiled.get((inputs.bucket, inputs.tbo))
        if built is not None:
            logits, self.cache = built(self.params, self.cache, batch, page_table)
        else:
            logits, self.cache = self._step(self.params, self.cache, batch, page_table, tbo=inputs.tbo)
        s = inputs.sampling
        n = len(s.rows)
        if not n:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        # pad to every possible sampling row so the sampler compiles once
        cap = self.dp * self.layout.num_slots

        def pad(a):
            out = np.zeros(cap, a.dtype)
            out[:n] = a
            return out

        toks, lps = self._sample(logits, pad(s.rows), pad(s.temperature), pad(s.top_k), pad(s.top_p),
                                 pad(s.seed), pad(s.counter))
        return np.asarray(toks)[:n], np.asarray(lps)[:n]

    def precompile(self, shapes, workers: int = 4) -> dict:
        """Build the step for every (bucket, tbo) in `shapes` ahead of use: traced one after
        the other (Python), compiled by `workers` threads at once (XLA compiles outside the
        GIL), kept for `run`. A 43-layer step takes minutes to compile, a program per bucket:
        in parallel, warm-up takes about the longest of them instead of their sum. -> seconds
        {(bucket, tbo): (trace, compile)}."""
        import concurrent.futures
        import time

        lowered, times = {}, {}
        for bucket, tbo in shapes:
            if (bucket, tbo) in self._compiled or (bucket, tbo) in lowered:
                continue
            t0 = time.perf_counter()
            empty = pack_chunks([], bucket, self.layout.num_slots, split=tbo).arrays()
            batch = {k: self.global_array(np.stack([v] * self.dp)) for k, v in empty.items()}
            lowered[(bucket, tbo)] = self._step.lower(self.params, self.cache, batch,
                                                      self.global_array(self.page_table), tbo=tbo)
            times[(bucket, tbo)] = time.perf_counter() - t0

        def build(key):
            t0 = time.perf_counter()
            return key, lowered[key].compile(), time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for key, exe, sec in pool.map(build, list(lowered)):
                self._compiled[key] = exe
                times[key] = (times[key], sec)
        return times

    def restore_slots(self, restores) -> None:
        """Rebuild the listed (rank, slot, start_pos) slots' state from their pages (the page
        table must already hold their rows)."""
        if self._restore is None:
            raise ValueError("a step restores cached prefix state but the cache layout keeps no page state")
        slots = np.full((self.dp, self.layout.num_slots), self.layout.num_slots, np.int32)  # padding: dropped
        starts = np.zeros_like(slots)
        used = [0] * self.dp
        for r, slot, start in restores:
            slots[r, used[r]], starts[r, used[r]] = slot, start
            used[r] += 1
        self.cache = self._restore(self.cache, self.global_array(slots), self.global_array(starts),
                                   self.global_array(self.page_table))

    def global_array(self, x: np.ndarray):
        """A [dp, ...] host array as one global array sharded over `dp`: each process places
        only the rows of its own devices (every process holds the same host array)."""
        return place(x, self._dp_sharding)


def _gather_sample(logits, rows, temperature, top_k, top_p, seeds, counters):
    flat = logits.reshape(-1, logits.shape[-1])[rows]
    return sample_tokens(flat, temperature, top_k, top_p, seeds, counters)
