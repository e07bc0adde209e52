"""The DP step over packed buffers with the KV cache: the engine's step.

Same MoE / two-batch-overlap machinery as the full-sequence step (overlap.py); attention reads
and writes the rank's cache. With TBO the buffer's halves are the two chains (the packer cut
them at half the real tokens); chain A writes layer l's cache before chain B reads it, so a
request cut between the halves sees its first part exactly as a cached prefix."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from atom_jax.cache.restore import restore_slots
from atom_jax.loader import abstract_like
from atom_jax.models import trace_once
from atom_jax.models.cached_attention import PLANS, cached_attention
from atom_jax.sharding.mesh import DP
from atom_jax.sharding.overlap import Chain, RankStep, StepOptions
from atom_jax.sharding.placement import check_divisible, param_specs

PER_TOKEN = ("ids", "pos", "slot", "valid", "seg_start_idx", "seg_start_pos", "seg_end_pos", "state")


def _slice_batch(b: dict, lo: int, hi: int) -> dict:
    """A chain's tokens [lo, hi) of the batch, with an empty memo of the per-step plans its
    layers share (models/cached_attention.PLANS)."""
    out = {k: b[k][lo:hi] for k in PER_TOKEN}
    out["seg_start_idx"] = out["seg_start_idx"] - lo
    out[PLANS] = {}
    return out


class CachedRankStep(RankStep):
    def __init__(self, model, opts, dp, cache, page_table, layout):
        super().__init__(model, opts, dp)
        self.cache, self.page_table, self.layout = list(cache), page_table, layout

    def attend_chain(self, layer, block, chain, other, x):
        out, self.cache[layer] = cached_attention(block.attn, x, chain.context, self.cache[layer],
                                                  self.page_table, self.layout, self.opts.attn_backend)
        return out

    def __call__(self, b: dict, tbo: bool):
        t = b["ids"].shape[0]
        bounds = [(0, t // 2), (t // 2, t)] if tbo else [(0, t)]
        chains = []
        for lo, hi in bounds:
            ids = b["ids"][lo:hi]
            chains.append(Chain(ids, self.model.embed_streams(ids), context=_slice_batch(b, lo, hi)))
        self.run(chains)
        # each sampled chunk has a token here: a step of t tokens samples at most t of them; the last
        # layer's merge runs for those rows alone (a prefill chunk of 8K tokens samples one)
        rows = b["sample_idx"][: min(t, b["sample_idx"].shape[0])]
        return self.model.logits(self.final_streams(chains, rows)), self.cache


def make_cached_step(model, mesh, layout, opts: StepOptions = StepOptions()):
    """-> (step, specs): `step(params, cache, batch, page_table, tbo=False)` ->
    (logits [dp, S, vocab], cache): S = min(T, len(sample_idx)) for T tokens per rank (the
    first S entries of sample_idx: a step samples at most one token per chunk).

    params: the model's pure param dict placed per `param_specs`; cache: list of per-layer
    dicts whose arrays carry a leading [dp] axis; batch: PackedBatch arrays stacked to [dp, ...]
    (packed with `split=tbo`); page_table [dp, slots, max_pages]; tbo: a static bool, the
    scheduler's `StepPlan.tbo`. The cache is donated (updated in place)."""
    dp = mesh.shape[DP]
    check_divisible(model.cfg, dp, opts.expert_mode, model.weights)
    graphdef, state = nnx.split(model)
    specs = param_specs(state.to_pure_dict(), opts.expert_mode, model.expert_layout)
    skeleton = abstract_like(model)

    def body(local_params, cache, batch, page_table, tbo):
        st = nnx.split(skeleton)[1]
        nnx.replace_by_pure_dict(st, local_params)
        squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
        runner = CachedRankStep(nnx.merge(graphdef, st), opts, dp, squeeze(cache), page_table[0], layout)
        with trace_once.session(opts.trace_layers_once):
            logits, new_cache = runner(squeeze(batch), tbo)
        return logits[None], jax.tree.map(lambda a: a[None], new_cache)

    def step(params, cache, batch, page_table, tbo: bool = False):
        sharded = jax.shard_map(partial(body, tbo=bool(tbo)), mesh=mesh, in_specs=(specs, P(DP), P(DP), P(DP)),
                                out_specs=(P(DP), P(DP)), check_vma=False)
        return sharded(params, cache, batch, page_table)

    return jax.jit(step, donate_argnums=(1,), static_argnames=("tbo",)), specs


def make_restore(mesh, layout):
    """-> restore(cache, slots [dp, K], starts [dp, K], entries [dp, K, window_pages]) -> cache:
    each rank rebuilds its listed slots' state from the window-state entries of the pages
    before their start (cache/restore.py); padding rows carry slot >= num_slots. The cache is
    donated."""

    def body(cache, slots, starts, entries):
        squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
        out = restore_slots(squeeze(cache), slots[0], starts[0], entries[0], layout.page_tokens)
        return jax.tree.map(lambda a: a[None], out)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(DP),) * 4, out_specs=P(DP), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0,))
