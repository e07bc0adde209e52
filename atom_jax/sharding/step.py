"""The full-sequence DP step (no KV cache): [dp * rows, seq] token ids -> logits or hidden.

Used by the DP-step benchmark, the profiler tests and the sharding tests; the engine runs the
cached step (cached_step.py). The layer loop and the two-batch-overlap schedule live in
overlap.py. With TBO the rank's [rows, seq] block is cut at half its tokens (microbatch.py),
inside a row when needed: that row's second part reads the first part's attention input of
each layer as its prefix.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.loader import abstract_like, abstract_model
from atom_jax.models import trace_once
from atom_jax.models.deepseek_v4 import Block, DeepseekV4
from atom_jax.models.layers import rms_norm
from atom_jax.models.packed_params import SCALE, random_leaf
from atom_jax.sharding.emulate import check_emulation, emulated, emulated_params
from atom_jax.sharding.mesh import DP
from atom_jax.weights.formats import BF16, NMAJOR
from atom_jax.sharding.microbatch import Segment, split_two, whole
from atom_jax.sharding.overlap import Chain, RankStep, StepOptions
from atom_jax.sharding.placement import BY_EXPERT, check_divisible, param_specs


@dataclasses.dataclass
class Segments:
    """A full-sequence chain's pieces of the rank block, and per piece the attention input of
    the current layer (the prefix source for the other chain's continuation of a row)."""

    segments: tuple[Segment, ...]
    attn_in: dict = dataclasses.field(default_factory=dict)


def _take(block, seg: Segment):
    return block[seg.row0: seg.row0 + seg.rows, seg.start: seg.start + seg.length]


class FullSeqRankStep(RankStep):
    def attend_chain(self, layer: int, block: Block, chain: Chain, other: Chain | None, x):
        """Full-sequence attention per segment; a segment continuing a row the other chain
        started reads that chain's attention input of this layer as its prefix."""
        outs, attn_in, off = [], {}, 0
        for seg in chain.context.segments:
            xs = x[off: off + seg.tokens].reshape(seg.rows, seg.length, -1)
            pos = jnp.broadcast_to(seg.start + jnp.arange(seg.length), (seg.rows, seg.length))
            prefix = other.context.attn_in[(seg.row0, seg.start)] if seg.start > 0 else None
            attn_in[(seg.row0, seg.start + seg.length)] = xs
            outs.append(block.attn(xs, pos, prefix).reshape(seg.tokens, -1))
            off += seg.tokens
        chain.context.attn_in = attn_in
        return jnp.concatenate(outs, axis=0)

    def __call__(self, ids, tbo: bool):
        rows, seq = ids.shape
        tbo = tbo and rows * seq >= 2
        seg_sets = split_two(rows, seq) if tbo else (whole(rows, seq),)
        chains = []
        for segs in seg_sets:
            flat = jnp.concatenate([_take(ids, s).reshape(-1) for s in segs])
            chains.append(Chain(flat, self.model.embed_streams(flat), context=Segments(segs)))
        self.run(chains)
        return self.assemble(chains, rows, seq)

    def assemble(self, chains, rows, seq):
        m = self.model
        width = self.cfg.vocab_size if self.opts.output == "logits" else self.cfg.hidden_size
        out = jnp.zeros((rows, seq, width), jnp.float32 if self.opts.output == "logits" else m.dtype)
        for chain in chains:
            streams = self.final_streams([chain])
            if self.opts.output == "logits":
                vals = m.logits(streams)
            else:
                vals = rms_norm(m.hc_head(streams), m.norm[...], self.cfg.rms_norm_eps)
            off = 0
            for seg in chain.context.segments:
                piece = vals[off: off + seg.tokens].reshape(seg.rows, seg.length, width).astype(out.dtype)
                out = jax.lax.dynamic_update_slice(out, piece, (seg.row0, seg.start, 0))
                off += seg.tokens
        return out


def make_step(model: DeepseekV4, mesh, opts: StepOptions = StepOptions(), place: bool = True,
              emulate_dp: int | None = None):
    """-> (step, params): `step(params, token_ids, tbo=False)` with token_ids [dp * rows, seq]
    sharded by rows over `dp` and `tbo` a static bool (two-batch overlap); returns [dp * rows, seq, vocab] logits (or hidden). `params` are the model's
    parameters placed on the mesh (experts sharded per `opts.expert_mode`); with `place=False`
    (an abstract model, e.g. for benchmarks that initialise on device) params is None."""
    dp = mesh.shape[DP]
    check_divisible(model.cfg, emulate_dp or dp, opts.expert_mode, model.weights)
    graphdef, state = nnx.split(model)
    pure = state.to_pure_dict()
    specs = param_specs(pure, opts.expert_mode, model.expert_layout)
    params = None
    if place:
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), pure, specs)
    rank_step = FullSeqRankStep
    if emulate_dp:  # each device runs one rank of dp=emulate_dp (sharding/emulate.py)
        check_emulation(model.cfg.n_routed_experts, dp, emulate_dp, opts.expert_mode)
        rank_step = partial(emulated(FullSeqRankStep), virtual_dp=emulate_dp)
        if place:
            params = emulated_params(params, mesh, emulate_dp)
    skeleton = abstract_like(model)

    def body(local_params, ids, tbo):
        st = nnx.split(skeleton)[1]
        nnx.replace_by_pure_dict(st, local_params)
        with trace_once.session(opts.trace_layers_once):
            return rank_step(nnx.merge(graphdef, st), opts, dp)(ids, tbo)

    def step(params, ids, tbo: bool = False):
        sharded = jax.shard_map(partial(body, tbo=bool(tbo)), mesh=mesh, in_specs=(specs, P(DP)),
                                out_specs=P(DP), check_vma=False)
        return sharded(params, ids)

    return jax.jit(step, static_argnames=("tbo",)), params


def random_params_on_mesh(cfg, mesh, opts: StepOptions, dtype=jnp.bfloat16, seed: int = 0, weights: str = BF16,
                          experts: int | None = None, expert_layout: str = NMAJOR):
    """Random parameters created directly on the devices, already sharded (a V4-Flash layer is
    ~13 GB of experts: building it on the host first would not fit). `weights` "native" makes
    the packed FP4 / FP8 parameters directly (packed_params.random_leaf), "fp4-experts" the FP4
    experts packed and the projections dense (random in `dtype`: nothing to decode). `experts`:
    hold only the first this many routed experts (dp emulation, sharding/emulate.py).
    `expert_layout`: the FP4 experts' code layout (weights.formats: the codes are random bytes
    in that shape)."""
    model = abstract_model(cfg, dtype, weights=weights, expert_layout=expert_layout)
    pure = nnx.split(model)[1].to_pure_dict()
    specs = param_specs(pure, opts.expert_mode, model.expert_layout)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(pure)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    makers = {}  # one compiled maker per (shape, dtype, spec): layers repeat, so few compiles
    out = []
    expert_stack = jax.tree.leaves(param_specs(pure, BY_EXPERT), is_leaf=lambda x: isinstance(x, P))
    for i, ((path, leaf), spec) in enumerate(zip(leaves_with_path, spec_leaves)):
        scale = str(getattr(path[-1], "key", path[-1])).endswith(SCALE)
        shape = leaf.shape if experts is None or expert_stack[i] == P() else (experts,) + leaf.shape[1:]
        sig = (scale, shape, jnp.dtype(leaf.dtype), spec)
        if sig not in makers:
            makers[sig] = jax.jit(partial(_random_leaf, scale, shape, jnp.dtype(leaf.dtype), cfg.n_routed_experts),
                                  out_shardings=NamedSharding(mesh, spec))
        out.append(makers[sig](jax.random.fold_in(jax.random.key(seed), i)))
    return model, jax.tree.unflatten(treedef, out)


def _random_leaf(scale: bool, shape, dtype, n_experts, key):
    if dtype == jnp.uint8 or scale:  # packed FP4 / FP8 codes and their scales
        return random_leaf(key, SCALE if scale else "codes", shape, dtype)
    if jnp.issubdtype(dtype, jnp.integer):  # hash-routing tables: expert ids
        return jax.random.randint(key, shape, 0, n_experts, dtype)
    if len(shape) == 1:  # norms, biases, sinks: ones / small values
        return (1.0 + 0.02 * jax.random.normal(key, shape)).astype(dtype)
    return (0.02 * jax.random.normal(key, shape)).astype(dtype)


def shard_tokens(ids, mesh):
    return jax.device_put(jnp.asarray(ids, jnp.int32), NamedSharding(mesh, P(DP)))
