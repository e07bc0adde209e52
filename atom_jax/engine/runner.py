"""ModelRunner: owns the parameters on the mesh, the per-rank caches and the compiled steps;
turns a scheduler StepPlan into packed buffers, runs one step and samples on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.engine.sampling import sample_tokens
from atom_jax.sharding import DP, StepOptions
from atom_jax.sharding.cached_step import make_cached_step


class ModelRunner:
    def __init__(self, model, mesh, layout: CacheLayout, opts: StepOptions = StepOptions()):
        self.model, self.mesh, self.layout = model, mesh, layout
        self.dp = mesh.shape[DP]
        self.cfg = model.cfg
        self._steps = {}
        for tbo in (False, True):
            self._steps[tbo], specs = make_cached_step(model, mesh, layout, StepOptions(**{**opts.__dict__, "tbo": tbo}))
        pure = nnx.split(model)[1].to_pure_dict()
        self.params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), pure, specs)
        shard = NamedSharding(mesh, P(DP))
        one = init_cache(self.cfg, layout, model.dtype)
        self.cache = jax.tree.map(lambda a: jax.device_put(jnp.broadcast_to(a, (self.dp,) + a.shape), shard), one)
        self.page_table = np.zeros((self.dp, layout.num_slots, layout.max_pages_per_seq), np.int32)
        self._sample = jax.jit(sample_tokens)

    def execute(self, plan, sampling_of) -> dict:
        """Run one planned step. `sampling_of(seq)` -> (temperature, top_k, top_p, seed).
        -> {request_id: (token, logprob)} for every chunk that samples."""
        per_rank, samplers = [], []
        for r, work in enumerate(plan.per_rank):
            chunks = []
            for w in work:
                seq = w.seq
                self.page_table[r, seq.slot] = 0
                self.page_table[r, seq.slot, : len(seq.pages)] = seq.pages
                chunks.append((seq.slot, w.start_pos, np.asarray(w.token_ids(), np.int32), w.sample))
            per_rank.append(pack_chunks(chunks, plan.bucket, self.layout.num_slots, split=plan.tbo))
            samplers.append([w.seq for w in work if w.sample])
        batch = {k: jnp.stack([jnp.asarray(b.arrays()[k]) for b in per_rank]) for k in per_rank[0].arrays()}
        logits, self.cache = self._steps[plan.tbo](self.params, self.cache, batch, jnp.asarray(self.page_table))
        rows, seqs = [], []
        for r, ss in enumerate(samplers):
            for j, seq in enumerate(ss):
                rows.append(r * self.layout.num_slots + j)
                seqs.append(seq)
        if not seqs:
            return {}
        # pad to every possible sampling row so the sampler compiles once
        n = len(seqs)
        cap = self.dp * self.layout.num_slots
        idx = np.zeros(cap, np.int32)
        idx[:n] = rows
        params = np.zeros((cap, 4), np.float64)
        params[:n] = [sampling_of(s) for s in seqs]
        counters = np.zeros(cap, np.uint32)
        counters[:n] = [len(s.output_token_ids) for s in seqs]
        flat = logits.reshape(-1, logits.shape[-1])[jnp.asarray(idx)]
        toks, lps = self._sample(flat, jnp.asarray(params[:, 0], jnp.float32), jnp.asarray(params[:, 1], jnp.int32),
                                 jnp.asarray(params[:, 2], jnp.float32), jnp.asarray(params[:, 3], jnp.uint32),
                                 jnp.asarray(counters))
        toks, lps = np.asarray(toks)[:n], np.asarray(lps)[:n]
        return {s.request_id: (int(t), float(lp)) for s, t, lp in zip(seqs, toks, lps)}
