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
from atom_jax.sharding.cached_step import make_cached_step
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


class ModelRunner:
    def __init__(self, model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions()):
        self.model, self.mesh, self.layout = model, mesh, layout
        self.dp = mesh.shape[DP]
        self.cfg = model.cfg
        self._steps = {}
        for tbo in (False, True):
            self._steps[tbo], _ = make_cached_step(model, mesh, layout, StepOptions(**{**opts.__dict__, "tbo": tbo}))
        # the same specs make_cached_step compiled against (param_specs of this expert mode)
        self.params = shard_params(nnx.split(model)[1].to_pure_dict(), mesh, opts.expert_mode)
        shard = self._dp_sharding = NamedSharding(mesh, P(DP))
        one = init_cache(self.cfg, layout, model.dtype)
        self.cache = jax.tree.map(lambda a: place(jnp.broadcast_to(a, (self.dp,) + a.shape), shard), one)
        self.page_table = np.zeros((self.dp, layout.num_slots, layout.max_pages_per_seq), np.int32)
        # tokens come back replicated, so every process (the scheduler's too) can read them
        self._sample = jax.jit(_gather_sample, out_shardings=NamedSharding(mesh, P()))

    def execute(self, plan, sampling_of) -> dict:
        """Run one planned step. `sampling_of(seq)` -> (temperature, top_k, top_p, seed).
        -> {request_id: (token, logprob)} for every chunk that samples."""
        inputs, seqs = self.host_inputs(plan, sampling_of)
        return self.results(seqs, *self.run(inputs))

    def host_inputs(self, plan, sampling_of) -> tuple[StepInputs, list]:
        """The host side of a step (numpy only, no device work): what every process of a
        multi-host run needs to execute it, and the sampled sequences in sampling-row order.
        Page-table rows are sent only when they differ from the table as it stands."""
        chunks, page_rows, rows, seqs = [], [], [], []
        for r, work in enumerate(plan.per_rank):
            rank_chunks, j = [], 0
            for w in work:
                seq = w.seq
                pages = np.asarray(seq.pages, np.int32)
                row = self.page_table[r, seq.slot]
                if np.any(row[: len(pages)] != pages) or np.any(row[len(pages):]):
                    page_rows.append((r, seq.slot, pages))
                rank_chunks.append((seq.slot, w.start_pos, np.asarray(w.token_ids(), np.int32), bool(w.sample)))
                if w.sample:
                    rows.append(r * self.layout.num_slots + j)
                    seqs.append(seq)
                    j += 1
            chunks.append(rank_chunks)
        n = len(seqs)
        params = [sampling_of(s) for s in seqs]
        sampling = SamplingRows(
            rows=np.asarray(rows, np.int32),
            temperature=np.asarray([p[0] for p in params], np.float32).reshape(n),
            top_k=np.asarray([p[1] for p in params], np.int32).reshape(n),
            top_p=np.asarray([p[2] for p in params], np.float32).reshape(n),
            seed=np.asarray([int(p[3]) % 2**32 for p in params], np.uint32).reshape(n),
            counter=np.asarray([len(s.output_token_ids) for s in seqs], np.uint32).reshape(n))
        return StepInputs(plan.bucket, bool(plan.tbo), chunks, page_rows, sampling), seqs

    def run(self, inputs: StepInputs) -> tuple[np.ndarray, np.ndarray]:
        """The device side of a step; every process of a multi-host run calls it with the same
        inputs. -> (tokens, logprobs) of the sampling rows, on every process."""
        for r, slot, pages in inputs.page_rows:
            self.page_table[r, slot] = 0
            self.page_table[r, slot, : len(pages)] = pages
        per_rank = [pack_chunks(c, inputs.bucket, self.layout.num_slots, split=inputs.tbo) for c in inputs.chunks]
        batch = {k: self._global(np.stack([b.arrays()[k] for b in per_rank])) for k in per_rank[0].arrays()}
        logits, self.cache = self._steps[inputs.tbo](self.params, self.cache, batch, self._global(self.page_table))
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

    @staticmethod
    def results(seqs, toks, lps) -> dict:
        return {s.request_id: (int(t), float(lp)) for s, t, lp in zip(seqs, toks, lps)}

    def _global(self, x: np.ndarray):
        """A [dp, ...] host array as one global array sharded over `dp`: each process places
        only the rows of its own devices (every process holds the same host array)."""
        return place(x, self._dp_sharding)


def _gather_sample(logits, rows, temperature, top_k, top_p, seeds, counters):
    flat = logits.reshape(-1, logits.shape[-1])[rows]
    return sample_tokens(flat, temperature, top_k, top_p, seeds, counters)
