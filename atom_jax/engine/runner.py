"""ModelRunner: owns the parameters on the mesh, the per-rank caches and the compiled step;
turns a scheduler StepPlan into packed buffers, runs one step and samples on device."""

from __future__ import annotations

import dataclasses
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.cache.batch import TOKEN_KEYS
from atom_jax.engine.host_timing import HostClock
from atom_jax.engine.sampler import sample_tokens
from atom_jax.scheduler.pages import pages_for
from atom_jax.scheduler.sequence import PENDING
from atom_jax.sharding import DP, StepOptions
from atom_jax.sharding.cached_step import make_cached_step, make_restore
from atom_jax.sharding.memory import ProgramMemoryError, check_program_fits, free_device_bytes, program_temp_bytes
from atom_jax.sharding.placement import place, shard_params

# what a step program too large for the free device memory asks the user to lower
LOWER_FOR_MEMORY = ("lower --max-tokens-per-step (with --buckets: the largest bucket), --num-slots or "
                    "--num-pages (the KV cache), or run with --tbo off (a TBO step holds both micro-batches' "
                    "temporaries)")


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
    # [(rank, slot, start_pos, entries)]: slots admitted onto cached pages; their state is
    # rebuilt at start_pos from the window-state entries of the pages before it (prefix caching)
    restores: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PreparedStep:
    """A step ready to launch (`ModelRunner.prepare`): its input block (numpy in a one-process
    run: the program's call copies it; placed otherwise), the whole page table when the step
    replaces it (placed; else None), its restores and its number of sampling rows."""

    bucket: int
    tbo: bool
    block: object
    table: object
    restores: list
    n: int


class StepResult:
    """A dispatched step's sampled tokens, still on the device (replicated on every process).
    `fetch()` waits for the step and reads them: (tokens [n], logprobs [n]) of its sampling rows.
    `StepResult.packed(out, n)`: the compiled step's one output block [2, rows] int32 (tokens,
    then the logprobs' float32 bits), whose copy to the host starts as soon as the step ends."""

    def __init__(self, tokens, logprobs, n: int):
        self.tokens, self.logprobs, self.n = tokens, logprobs, n
        self._out = None

    @classmethod
    def packed(cls, out, n: int) -> "StepResult":
        res = cls(None, None, n)
        res._out = out
        if n:
            out.copy_to_host_async()  # one device-to-host copy, started without waiting here
        return res

    def fetch(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.n:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        if self._out is not None:
            out = np.asarray(self._out)[:, : self.n]
            return out[0], out[1].view(np.float32)
        return np.asarray(self.tokens)[: self.n], np.asarray(self.logprobs)[: self.n]


class ModelRunner:
    """The device side of the engine. One step is `run(host_inputs(plan))`: `host_inputs` is
    numpy only (what a multi-host leader broadcasts), `run` is what every process executes.

    `run` (`prepare`, then `launch`: with the engine's dispatch thread, the engine thread
    prepares and the dispatch thread launches) dispatches one compiled program (token fix-up, model step, sampler) and returns at
    once; its sampled tokens stay on the device, where the next step reads the ones it feeds
    back (a PENDING token of the overlap schedule: `host_inputs` encodes it as -(row + 1),
    the row of the previous step's sampler output)."""

    def __init__(self, model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions(), clock=None,
                 command_buffers: str = "xla"):
        """`clock`: the engine's `HostClock` (`prepare` charges its numpy packing to "pack", its
        host-to-device copies before the call to "transfer"); `command_buffers`: the step program's XLA GPU
        command buffers (`COMMAND_BUFFER_OPTIONS`)."""
        self.model, self.mesh, self.layout = model, mesh, layout
        self.clock = clock if clock is not None else HostClock()
        self.dp = mesh.shape[DP]
        self.cfg = model.cfg
        self.window_pages = pages_for(self.cfg.sliding_window, layout.page_tokens)  # pages a window spans
        self._compiled = {}  # (bucket, tbo) -> executable (`program`: built ahead by `precompile` or on first use)
        self.temp_bytes = {}  # (bucket, tbo) -> its temporary device bytes (None: not reported)
        # the same specs make_cached_step compiled against (param_specs of this expert mode)
        self.params = shard_params(nnx.split(model)[1].to_pure_dict(), mesh, opts.expert_mode, model.expert_layout)
        shard = self._dp_sharding = NamedSharding(mesh, P(DP))
        self._replicated = NamedSharding(mesh, P())
        one = init_cache(self.cfg, layout, model.dtype)
        self.cache = jax.tree.map(lambda a: place(jnp.broadcast_to(a, (self.dp,) + a.shape), shard), one)
        self.page_table = np.zeros((self.dp, layout.num_slots, layout.max_pages_per_seq), np.int32)
        self._restore = make_restore(mesh, layout) if layout.page_state else None
        # the page table on the device: a step writes the entries that changed (at most
        # `page_updates` per rank, sent in its input block); more than that uploads the whole
        # table (a restore reads no page table: the window-state entries come with it)
        self._page_table_dev = self.global_array(self.page_table.copy())  # (never the host table: see run)
        self.page_updates = page_updates_per_step(layout)
        self._no_updates = np.zeros((self.dp, self.page_updates, 3), np.int32)  # all padding (read only)
        self._no_updates[:, :, 0] = layout.num_slots
        self._no_updates.flags.writeable = False
        # (rank, slot) -> the pages host_inputs last sent for that row (the leader's planning
        # state, like _prev_rows; `forget_rows` after a failed step sends every row again)
        self._row_pages: dict[tuple[int, int], list[int]] = {}
        self._table_stale = False  # a prepare failed after writing the host table: upload it whole
        self._device_stale = False  # a launch failed: the device table may lack rows (launch)
        self._table_lock = threading.Lock()  # the host table: written by prepare, read by a stale launch
        self.max_samples = max_samples(layout, self.dp)  # sampler rows, padded: one compile per bucket
        # the previous step's output block [2, max_samples] (sampled tokens, logprob bits), on
        # the device: what PENDING inputs read
        self._last_out = place(np.zeros((2, self.max_samples), np.int32), self._replicated)
        self._prev_rows: dict[str, int] = {}  # request id -> row in _last_out (leader only)
        self.opts = opts
        self.use_command_buffers(command_buffers)

    def use_command_buffers(self, mode: str) -> None:
        """(Re)build the step program with these command buffers; programs built ahead by
        `precompile` are dropped (the next `precompile` or step compiles them anew)."""
        self._device_step = device_step_program(self.model, self.mesh, self.layout, self.opts, mode)
        self.command_buffers = mode
        self._compiled.clear()
        self.temp_bytes.clear()

    def host_inputs(self, plan) -> StepInputs:
        """The host side of a step (numpy only, no device work): what every process of a
        multi-host run needs to execute it. Sampling rows follow `plan.sampled()`; each
        sequence's parameters (its seed resolved when it was added) come from `seq.params`.
        Page-table rows are sent only when they differ from the table as it stands. A PENDING
        token (sampled by the previous step, not read yet) becomes -(its row + 1) there.
        Call once per step, in step order."""
        chunks, page_rows, rows, params, counters, restores = [], [], [], [], [], []
        prev_rows, next_rows, row_pages = self._prev_rows, {}, self._row_pages
        num_slots, page_tokens = self.layout.num_slots, self.layout.page_tokens
        for r, work in enumerate(plan.per_rank):
            rank_chunks, row = [], r * num_slots
            for w in work:
                seq = w.seq
                if row_pages.get((r, seq.slot)) != seq.pages:  # list compare: cheap per decode
                    page_rows.append((r, seq.slot, np.asarray(seq.pages, np.int32)))
                    row_pages[(r, seq.slot)] = list(seq.pages)
                toks = w.token_ids()  # a fresh list (the packer and the plan channel take lists)
                if toks and toks[-1] == PENDING:  # only the newest token can be pending
                    toks[-1] = -(prev_rows[seq.request_id] + 1)
                states = w.token_states(page_tokens)  # None without prefix caching
                rank_chunks.append((seq.slot, w.start_pos, toks, bool(w.sample), states))
                if w.restore:
                    restores.append((r, seq.slot, w.start_pos, w.restore_states))
                if w.sample:
                    next_rows[seq.request_id] = len(rows)
                    rows.append(row)
                    row += 1
                    params.append(seq.params)
                    counters.append(len(seq.output_token_ids))
            chunks.append(rank_chunks)
        self._prev_rows = next_rows
        n = len(rows)
        sampling = SamplingRows(
            rows=np.asarray(rows, np.int32).reshape(-1),
            temperature=np.fromiter([p.temperature for p in params], np.float32, n),
            top_k=np.fromiter([p.top_k for p in params], np.int32, n),
            top_p=np.fromiter([p.top_p for p in params], np.float32, n),
            seed=np.fromiter([p.seed % 2**32 for p in params], np.uint32, n),
            counter=np.asarray(counters, np.uint32).reshape(-1))
        return StepInputs(plan.bucket, bool(plan.tbo), chunks, page_rows, sampling, restores)

    def forget_rows(self) -> None:
        """A step failed: its page-table rows may never have reached the device table, so the
        next steps send every row they use again and the next prepared step the whole table."""
        self._row_pages.clear()
        self._table_stale = True

    def run(self, inputs: StepInputs) -> StepResult:
        """Dispatch a step (every process of a multi-host run calls it with the same inputs);
        returns without waiting for the device: `launch(prepare(inputs))` on one thread."""
        return self.launch(self.prepare(inputs))

    def prepare(self, inputs: StepInputs) -> PreparedStep:
        """The host side of a step's dispatch (the engine thread's, also with the dispatch
        thread): the host page table written, the step's one int32 input block packed
        (sampling rows, every rank's packed tokens and changed page-table entries); the whole
        page table placed only when more entries changed than a step carries. Touches no device
        state (cache, device page table, last output): `launch` does, in step order."""
        try:
            with self._table_lock:
                updates = self._update_page_table(inputs.page_rows)
                if self._table_stale:
                    updates = None
                # a copy: on CPU, device_put may alias (not copy) a numpy array, and the host
                # table is written in place by later steps while this one may still read it
                table = self.page_table.copy() if updates is None else None
            block = self._input_block(inputs, updates)
            self.clock.lap("pack")
            if table is not None:
                table = self.global_array(table)
            if jax.process_count() > 1:  # one process: the program's call copies the numpy block
                block = place(block, self._replicated)
            self.clock.lap("transfer")
        except BaseException:
            self._table_stale = True  # the host table may hold rows no step will send
            raise
        self._table_stale = False
        return PreparedStep(inputs.bucket, inputs.tbo, block, table, inputs.restores, len(inputs.sampling.rows))

    def launch(self, step: PreparedStep) -> StepResult:
        """Call the step program on a prepared step (the dispatch thread's part): the device
        page table replaced if the step carries a whole one, the restores run, the program
        called; its output block becomes the next step's last output. After a failed launch
        the device table may lack rows its step carried: the next launch uploads the host
        table (the engine drains the dispatch thread before it plans again, `Engine._fail`)."""
        try:
            if step.table is not None:
                self._page_table_dev = step.table
            elif self._device_stale:
                with self._table_lock:
                    self._page_table_dev = self.global_array(self.page_table.copy())
            if step.restores:
                self.restore_slots(step.restores)
            out = self.call_program(step.bucket, step.tbo, step.block)
        except BaseException:
            self._device_stale = True
            raise
        self._device_stale = False
        self._last_out = out
        return StepResult.packed(out, step.n)

    def call_program(self, bucket: int, tbo: bool, block):
        """Call the (bucket, tbo) step program (`program`) on an input block: numpy (copied by
        the call's C++ dispatch, much cheaper than a device_put from Python) or placed. The
        cache and the device page table advance; the output block is returned (`launch` keeps
        it as the next step's last output)."""
        built = self.program(bucket, tbo)
        self.cache, self._page_table_dev, out = built(self.params, self.cache, self._page_table_dev,
                                                      self._last_out, block)
        return out

    def program(self, bucket: int, tbo: bool):
        """The compiled (bucket, tbo) step program: built ahead by `precompile`, else compiled
        now (once). Always an ahead-of-time executable, whose input shardings are fixed, so a
        numpy block goes in as the replicated block it was compiled for (a jitted function
        would take it as an uncommitted argument: another compile, another program)."""
        built = self._compiled.get((bucket, tbo))
        if built is None:
            self.precompile([(bucket, tbo)], workers=1)  # (its temporaries measured and checked)
            built = self._compiled[(bucket, tbo)]
        return built

    def _lower(self, bucket: int, tbo: bool):
        """Trace and lower the (bucket, tbo) step program against the runner's arrays and an
        abstract replicated input block of that step's length."""
        block = jax.ShapeDtypeStruct((input_block_len(self.layout, self.dp, bucket, tbo),), jnp.int32,
                                     sharding=self._replicated)
        return self._device_step.lower(self.params, self.cache, self._page_table_dev, self._last_out, block, tbo=tbo)

    def _update_page_table(self, page_rows):
        """Write `page_rows` into the host table; -> the entries that changed, [dp, K, 3]
        (slot, index, page; padding slot = num_slots, dropped on the device), or None when a
        rank has more than K (then the whole table is uploaded)."""
        if not page_rows:
            return self._no_updates
        k = self.page_updates
        updates = self._no_updates.copy()
        used = [0] * self.dp
        overflow = False
        for r, slot, pages in page_rows:
            row = self.page_table[r, slot]
            new = np.zeros_like(row)
            new[: len(pages)] = pages
            (idx,) = np.nonzero(row != new)
            row[:] = new
            n = used[r]
            if n + len(idx) > k:
                overflow = True
            elif not overflow:
                updates[r, n: n + len(idx)] = np.stack([np.full_like(idx, slot), idx, new[idx]], axis=1)
                used[r] = n + len(idx)
        return None if overflow else updates

    def _input_block(self, inputs: StepInputs, updates) -> np.ndarray:
        """The step's one host-to-device block: [6, max_samples] sampling rows, then per rank
        its packed tokens and its [K, 3] page-table entries (all padding: none)."""
        if updates is None:
            updates = self._no_updates
        head = 6 * self.max_samples
        ranks = [_pack_batch(pack_chunks(c, inputs.bucket, self.layout.num_slots, split=inputs.tbo))
                 for c in inputs.chunks]
        row = len(ranks[0]) + updates[0].size
        block = np.empty(head + self.dp * row, np.int32)  # one fresh array per step (never reused)
        block[:head] = _pack_sampling(inputs.sampling, self.max_samples).reshape(-1)
        per_rank = block[head:].reshape(self.dp, row)
        per_rank[:, : len(ranks[0])] = ranks
        per_rank[:, len(ranks[0]):] = updates.reshape(self.dp, -1)
        return block

    def empty_inputs(self, bucket: int, tbo: bool) -> StepInputs:
        """A (bucket, tbo) step with no tokens and no samples (what `precompile` lowers with)."""
        none = np.zeros(0, np.int32)
        return StepInputs(bucket, tbo, [[] for _ in range(self.dp)], [],
                          SamplingRows(none, none.view(np.float32), none, none.view(np.float32),
                                       none.view(np.uint32), none.view(np.uint32)))

    def precompile(self, shapes, workers: int = 4) -> dict:
        """Build the step for every (bucket, tbo) in `shapes` ahead of use: traced one after
        the other (Python), compiled by `workers` threads at once (XLA compiles outside the
        GIL), kept for `run` (`program` compiles a missing one on first use). A 43-layer step takes minutes to compile, a program per bucket:
        in parallel, warm-up takes about the longest of them instead of their sum. -> seconds
        {(bucket, tbo): (trace, compile)}."""
        import concurrent.futures
        import time

        lowered, times = {}, {}
        for bucket, tbo in shapes:
            if (bucket, tbo) in self._compiled or (bucket, tbo) in lowered:
                continue
            t0 = time.perf_counter()
            lowered[(bucket, tbo)] = self._lower(bucket, tbo)
            times[(bucket, tbo)] = time.perf_counter() - t0

        def build(key):
            t0 = time.perf_counter()
            return key, lowered[key].compile(), time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for key, exe, sec in pool.map(build, list(lowered)):
                self._compiled[key] = exe
                self.temp_bytes[key] = program_temp_bytes(exe)
                times[key] = (times[key], sec)
        free = free_device_bytes(self.mesh.devices.flat)
        refused = None
        for bucket, tbo in sorted(lowered, key=lambda k: -(self.temp_bytes[k] or 0)):
            try:
                check_program_fits(f"the step program of bucket {bucket} (TBO {'on' if tbo else 'off'})",
                                   self.temp_bytes[(bucket, tbo)], free, LOWER_FOR_MEMORY)
            except ProgramMemoryError as e:
                # not kept: a later step of this shape checks again instead of running it unchecked
                # (an allocator failure on one rank leaves the others waiting in a collective)
                del self._compiled[(bucket, tbo)]
                refused = refused or e
        if refused is not None:
            raise refused  # the largest
        return times

    def restore_slots(self, restores) -> None:
        """Rebuild the listed (rank, slot, start_pos, entries) slots' state from the window-state
        entries of the pages before start_pos."""
        if self._restore is None:
            raise ValueError("a step restores cached prefix state but the cache layout keeps no page state")
        slots = np.full((self.dp, self.layout.num_slots), self.layout.num_slots, np.int32)  # padding: dropped
        starts = np.zeros_like(slots)
        entries = np.full(slots.shape + (self.window_pages,), -1, np.int32)
        used = [0] * self.dp
        for r, slot, start, states in restores:
            slots[r, used[r]], starts[r, used[r]], entries[r, used[r]] = slot, start, states
            used[r] += 1
        self.cache = self._restore(self.cache, self.global_array(slots), self.global_array(starts),
                                   self.global_array(entries))

    def global_array(self, x: np.ndarray):
        """A [dp, ...] host array as one global array sharded over `dp`: each process places
        only the rows of its own devices (every process holds the same host array)."""
        return place(x, self._dp_sharding)


# ---- the packed host-to-device buffers and the one jitted step program ------------------
def page_updates_per_step(layout: CacheLayout) -> int:
    """Page-table entries per rank a step's input block carries (more: the whole table is sent)."""
    return max(layout.num_slots, 16)


def max_samples(layout: CacheLayout, dp: int) -> int:
    """Sampler rows of every step, padded (one compile per bucket): every slot of every rank."""
    return dp * layout.num_slots


# --command-buffers -> the step program's XLA compile options. "off" clears XLA's repeated
# xla_gpu_enable_command_buffer (an empty value leaves no command type): each kernel is then
# launched on its own instead of through CUDA graphs that XLA updates when buffers move.
# "concurrent": XLA's default command types, but each graph's nodes depend on their operands'
# producers only (XLA's default, LHS, chains them in the scheduled order), so independent kernels
# may overlap; measured at batch 1 (4 layers, H200): 6% less device time a step, but a dearer
# launch (the graph's update), so the engine loop ties the default: an option, not the default.
COMMAND_BUFFER_OPTIONS = {"xla": None, "off": {"xla_gpu_enable_command_buffer": ""},
                          "concurrent": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}}


def device_step_program(model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions(),
                        command_buffers: str = "xla"):
    """The engine's one jitted step program, compiled per (bucket, tbo):
    `fn(params, cache, page_table, last_out, block, tbo=...)` (`_device_step`); the cache and
    the page table are donated (updated in place)."""
    if command_buffers not in COMMAND_BUFFER_OPTIONS:
        raise ValueError(f"unknown command_buffers {command_buffers!r}; known: {sorted(COMMAND_BUFFER_OPTIONS)}")
    step, _ = make_cached_step(model, mesh, layout, opts)
    dp = mesh.shape[DP]
    return jax.jit(partial(_device_step, step, mesh, layout.num_slots, max_samples(layout, dp),
                           page_updates_per_step(layout)), static_argnames=("tbo",), donate_argnums=(1, 2),
                   compiler_options=COMMAND_BUFFER_OPTIONS[command_buffers])


def input_block_len(layout: CacheLayout, dp: int, bucket: int, tbo: bool) -> int:
    """int32 words of a (bucket, tbo) step's input block (`ModelRunner._input_block`)."""
    row = len(_pack_batch(pack_chunks([], bucket, layout.num_slots, split=tbo))) + 3 * page_updates_per_step(layout)
    return 6 * max_samples(layout, dp) + dp * row

def _pack_batch(b) -> np.ndarray:
    """A rank's PackedBatch as one int32 row: the per-token arrays, then sample_idx."""
    return np.concatenate([getattr(b, k).astype(np.int32) for k in TOKEN_KEYS] + [b.sample_idx])


def _unpack_batch(packed, num_slots: int) -> dict:
    t = (packed.shape[-1] - num_slots) // len(TOKEN_KEYS)
    out = {k: packed[:, i * t: (i + 1) * t] for i, k in enumerate(TOKEN_KEYS)}
    out["valid"] = out["valid"] != 0
    out["sample_idx"] = packed[:, len(TOKEN_KEYS) * t:]
    return out


def _pack_sampling(s: SamplingRows, cap: int) -> np.ndarray:
    """[6, cap] int32 (floats and uint32 by bit pattern), padded to every possible row."""
    out = np.zeros((6, cap), np.int32)
    n = len(s.rows)
    for i, a in enumerate((s.rows, s.temperature, s.top_k, s.top_p, s.seed, s.counter)):
        out[i, :n] = np.asarray(a).view(np.int32) if a.dtype.itemsize == 4 else a
    return out


def _device_step(step, mesh, num_slots, max_samples, num_updates, params, cache, page_table, last_out, block, tbo):
    """One engine step on the device: unpack the input block (`ModelRunner._input_block`),
    write the changed page-table entries, feed PENDING tokens from `last_out`, run the model,
    sample. -> (cache, page_table, out [2, max_samples]: tokens, logprob bits)."""
    dp = mesh.shape[DP]
    sampling = block[: 6 * max_samples].reshape(6, max_samples)
    per_rank = jax.lax.with_sharding_constraint(block[6 * max_samples:].reshape(dp, -1), NamedSharding(mesh, P(DP)))
    packed, updates = per_rank[:, : -3 * num_updates], per_rank[:, -3 * num_updates:].reshape(dp, num_updates, 3)
    page_table = jax.shard_map(_write_pages, mesh=mesh, in_specs=(P(DP), P(DP)), out_specs=P(DP))(page_table, updates)
    batch = _unpack_batch(packed, num_slots)
    ids = batch["ids"]  # a negative id -(r + 1): the previous step's sampled token r
    batch["ids"] = jnp.where(ids < 0, last_out[0][jnp.maximum(-ids - 1, 0)], ids)
    logits, cache = step(params, cache, batch, page_table, tbo=tbo)
    f32, u32 = (lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)), (lambda a: jax.lax.bitcast_convert_type(a, jnp.uint32))  # noqa: E731
    # logits [dp, S, vocab]: S = min(bucket, num_slots) rows per rank (a step of `bucket` tokens
    # per rank samples at most that many), so the sampler runs on dp * S rows, not on every
    # slot's (at bucket 1 and 64 slots: 2 rows of the vocabulary to search instead of 128).
    # The host's rows are rank * num_slots + j (j < S) and fill the first columns.
    s = logits.shape[1]
    cap = dp * s
    rows = sampling[0, :cap]
    flat = logits.reshape(-1, logits.shape[-1])[(rows // num_slots) * s + rows % num_slots]
    toks, lps = sample_tokens(flat, f32(sampling[1, :cap]), sampling[2, :cap], f32(sampling[3, :cap]),
                              u32(sampling[4, :cap]), u32(sampling[5, :cap]))
    # one block, replicated, so every process (the scheduler's too) reads it in one copy; padded
    # to max_samples columns, the shape every bucket's program reads back as `last_out`
    out = jnp.stack([toks, jax.lax.bitcast_convert_type(lps, jnp.int32)])
    out = jnp.pad(out, ((0, 0), (0, max_samples - cap)))
    return cache, page_table, jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


def _write_pages(page_table, updates):
    """One rank: page_table [1, slots, max_pages] <- updates [1, K, 3] (slot, index, page);
    a padding entry's slot is out of range and dropped."""
    u = updates[0]
    return page_table.at[0, u[:, 0], u[:, 1]].set(u[:, 2], mode="drop")
