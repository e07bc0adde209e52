"""ModelRunner: owns the parameters on the mesh, the per-rank caches and the compiled step;
turns a scheduler StepPlan into packed buffers, runs one step and samples on device."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.engine.host_timing import HostClock
from atom_jax.engine.sampler import sample_tokens
from atom_jax.scheduler.sequence import PENDING
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


class StepResult:
    """A dispatched step's sampled tokens, still on the device (replicated on every process).
    `fetch()` waits for the step and reads them: (tokens [n], logprobs [n]) of its sampling rows."""

    def __init__(self, tokens, logprobs, n: int):
        self.tokens, self.logprobs, self.n = tokens, logprobs, n

    def fetch(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.n:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        return np.asarray(self.tokens)[: self.n], np.asarray(self.logprobs)[: self.n]


class ModelRunner:
    """The device side of the engine. One step is `run(host_inputs(plan))`: `host_inputs` is
    numpy only (what a multi-host leader broadcasts), `run` is what every process executes.

    `run` dispatches one compiled program (token fix-up, model step, sampler) and returns at
    once; its sampled tokens stay on the device, where the next step reads the ones it feeds
    back (a PENDING token of the overlap schedule: `host_inputs` encodes it as -(row + 1),
    the row of the previous step's sampler output)."""

    def __init__(self, model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions(), clock=None):
        """`clock`: the engine's `HostClock` (`run` charges its numpy packing to "pack", its
        host-to-device copies to "transfer")."""
        self.model, self.mesh, self.layout = model, mesh, layout
        self.clock = clock if clock is not None else HostClock()
        self.dp = mesh.shape[DP]
        self.cfg = model.cfg
        self._compiled = {}  # (bucket, tbo) -> executable built ahead by `precompile`
        # the same specs make_cached_step compiled against (param_specs of this expert mode)
        self.params = shard_params(nnx.split(model)[1].to_pure_dict(), mesh, opts.expert_mode)
        shard = self._dp_sharding = NamedSharding(mesh, P(DP))
        self._replicated = NamedSharding(mesh, P())
        one = init_cache(self.cfg, layout, model.dtype)
        self.cache = jax.tree.map(lambda a: place(jnp.broadcast_to(a, (self.dp,) + a.shape), shard), one)
        self.page_table = np.zeros((self.dp, layout.num_slots, layout.max_pages_per_seq), np.int32)
        self._restore = make_restore(mesh, layout) if layout.page_state else None
        self._page_table_dev = self.global_array(self.page_table)
        self._row_pages: dict[tuple[int, int], list[int]] = {}  # (rank, slot) -> pages in page_table
        self.max_samples = self.dp * layout.num_slots  # sampler rows, padded: one compile per bucket
        # the previous step's sampled tokens, on the device (what PENDING inputs read)
        self._last_tokens = place(np.zeros(self.max_samples, np.int32), self._replicated)
        self._prev_rows: dict[str, int] = {}  # request id -> row in _last_tokens (leader only)
        step, _ = make_cached_step(model, mesh, layout, opts)
        # one jitted program per (bucket, tbo); the cache is donated (updated in place)
        self._device_step = jax.jit(partial(_device_step, step, self._replicated, layout.num_slots),
                                    static_argnames=("tbo",), donate_argnums=(1,))

    def host_inputs(self, plan) -> StepInputs:
        """The host side of a step (numpy only, no device work): what every process of a
        multi-host run needs to execute it. Sampling rows follow `plan.sampled()`; each
        sequence's parameters (its seed resolved when it was added) come from `seq.params`.
        Page-table rows are sent only when they differ from the table as it stands. A PENDING
        token (sampled by the previous step, not read yet) becomes -(its row + 1) there.
        Call once per step, in step order."""
        chunks, page_rows, rows, params, counters, restores = [], [], [], [], [], []
        prev_rows, next_rows = self._prev_rows, {}
        for r, work in enumerate(plan.per_rank):
            rank_chunks, j = [], 0
            for w in work:
                seq = w.seq
                if self._row_pages.get((r, seq.slot)) != seq.pages:  # list compare: cheap per decode
                    page_rows.append((r, seq.slot, np.asarray(seq.pages, np.int32)))
                toks = np.asarray(w.token_ids(), np.int32)
                if toks.size and toks[-1] == PENDING:  # only the newest token can be pending
                    toks[-1] = -(prev_rows[seq.request_id] + 1)
                rank_chunks.append((seq.slot, w.start_pos, toks, bool(w.sample)))
                if w.restore:
                    restores.append((r, seq.slot, w.start_pos))
                if w.sample:
                    next_rows[seq.request_id] = len(rows)
                    rows.append(r * self.layout.num_slots + j)
                    params.append(seq.params)
                    counters.append(len(seq.output_token_ids))
                    j += 1
            chunks.append(rank_chunks)
        self._prev_rows = next_rows
        sampling = SamplingRows(
            rows=np.asarray(rows, np.int32).reshape(-1),
            temperature=np.asarray([p.temperature for p in params], np.float32).reshape(-1),
            top_k=np.asarray([p.top_k for p in params], np.int32).reshape(-1),
            top_p=np.asarray([p.top_p for p in params], np.float32).reshape(-1),
            seed=np.asarray([p.seed % 2**32 for p in params], np.uint32).reshape(-1),
            counter=np.asarray(counters, np.uint32).reshape(-1))
        return StepInputs(plan.bucket, bool(plan.tbo), chunks, page_rows, sampling, restores)

    def run(self, inputs: StepInputs) -> StepResult:
        """Dispatch a step (every process of a multi-host run calls it with the same inputs);
        returns without waiting for the device. Host-to-device: one packed token buffer, one
        packed sampling block, and the page table only when a row changed."""
        table = None
        if inputs.page_rows:
            # A new host array each time, never the placed one mutated: on CPU, device_put may
            # alias (not copy) a numpy array, and the step dispatched before still reads it.
            table = self.page_table.copy()
            for r, slot, pages in inputs.page_rows:
                table[r, slot] = 0
                table[r, slot, : len(pages)] = pages
                self._row_pages[(r, slot)] = np.asarray(pages).tolist()
            self.page_table = table
        per_rank = [pack_chunks(c, inputs.bucket, self.layout.num_slots, split=inputs.tbo) for c in inputs.chunks]
        packed = np.stack([_pack_batch(b) for b in per_rank])
        sampling = _pack_sampling(inputs.sampling, self.max_samples)
        self.clock.lap("pack")
        if table is not None:
            self._page_table_dev = self.global_array(table)
        if inputs.restores:
            self.restore_slots(inputs.restores)
        packed = self.global_array(packed)
        sampling = place(sampling, self._replicated)
        self.clock.lap("transfer")
        args = (self.params, self.cache, packed, self._page_table_dev, self._last_tokens, sampling)
        built = self._compiled.get((inputs.bucket, inputs.tbo))
        if built is not None:
            self.cache, toks, lps = built(*args)
        else:
            self.cache, toks, lps = self._device_step(*args, tbo=inputs.tbo)
        self._last_tokens = toks
        return StepResult(toks, lps, len(inputs.sampling.rows))

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
            empty = _pack_batch(pack_chunks([], bucket, self.layout.num_slots, split=tbo))
            packed = self.global_array(np.stack([empty] * self.dp))
            sampling = place(np.zeros((6, self.max_samples), np.int32), self._replicated)
            lowered[(bucket, tbo)] = self._device_step.lower(self.params, self.cache, packed, self._page_table_dev,
                                                             self._last_tokens, sampling, tbo=tbo)
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
                                   self._page_table_dev)

    def global_array(self, x: np.ndarray):
        """A [dp, ...] host array as one global array sharded over `dp`: each process places
        only the rows of its own devices (every process holds the same host array)."""
        return place(x, self._dp_sharding)


# ---- the packed host-to-device buffers and the one jitted step program ------------------
_TOKEN_KEYS = ("ids", "pos", "slot", "valid", "seg_start_idx", "seg_start_pos", "seg_end_pos")


def _pack_batch(b) -> np.ndarray:
    """A rank's PackedBatch as one int32 row: the per-token arrays, then sample_idx."""
    return np.concatenate([getattr(b, k).astype(np.int32) for k in _TOKEN_KEYS] + [b.sample_idx])


def _unpack_batch(packed, num_slots: int) -> dict:
    t = (packed.shape[-1] - num_slots) // len(_TOKEN_KEYS)
    out = {k: packed[:, i * t: (i + 1) * t] for i, k in enumerate(_TOKEN_KEYS)}
    out["valid"] = out["valid"] != 0
    out["sample_idx"] = packed[:, len(_TOKEN_KEYS) * t:]
    return out


def _pack_sampling(s: SamplingRows, cap: int) -> np.ndarray:
    """[6, cap] int32 (floats and uint32 by bit pattern), padded to every possible row."""
    out = np.zeros((6, cap), np.int32)
    n = len(s.rows)
    for i, a in enumerate((s.rows, s.temperature, s.top_k, s.top_p, s.seed, s.counter)):
        out[i, :n] = np.asarray(a).view(np.int32) if a.dtype.itemsize == 4 else a
    return out


def _device_step(step, replicated, num_slots, params, cache, packed, page_table, last_tokens, sampling, tbo):
    batch = _unpack_batch(packed, num_slots)
    ids = batch["ids"]  # a negative id -(r + 1): the previous step's sampled token r
    batch["ids"] = jnp.where(ids < 0, last_tokens[jnp.maximum(-ids - 1, 0)], ids)
    logits, cache = step(params, cache, batch, page_table, tbo=tbo)
    f32, u32 = (lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)), (lambda a: jax.lax.bitcast_convert_type(a, jnp.uint32))  # noqa: E731
    rows = sampling[0]
    flat = logits.reshape(-1, logits.shape[-1])[rows]
    toks, lps = sample_tokens(flat, f32(sampling[1]), sampling[2], f32(sampling[3]), u32(sampling[4]), u32(sampling[5]))
    # tokens come back replicated, so every process (the scheduler's too) can read them
    toks = jax.lax.with_sharding_constraint(toks, replicated)
    lps = jax.lax.with_sharding_constraint(lps, replicated)
    return cache, toks, lps
