"""The data-parallel step: every layer inside one `jax.shard_map` over `dp`.

Attention runs per rank on the rank's own tokens; the MoE gathers every rank's tokens with
`all_gather(tiled=True)`, computes the experts this rank holds, and returns each rank its own
tokens summed over ranks with `psum_scatter(tiled=True)`. The shared expert runs locally.

Two-batch overlap (TBO): the rank's tokens are cut into two equal micro-batch chains, A and B,
interleaved per layer with `optimization_barrier` so that each collective of one chain has the
other chain's compute to hide behind (DESIGN.md section 3):
    attn(A) | AG(A) || attn(B) | MoE(A) || AG(B) | RS(A) || MoE(B) | RS(B) || attn(A, next layer)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.loader import abstract_model
from atom_jax.models.deepseek_v4 import Block, DeepseekV4
from atom_jax.models.hyper import hc_merge
from atom_jax.models.layers import rms_norm
from atom_jax.models.packed_params import BF16, SCALE, random_leaf
from atom_jax.scheduler import TBO_MIN_TOKENS
from atom_jax.sharding.mesh import DP
from atom_jax.sharding.microbatch import Segment, split_two, whole
from atom_jax.sharding.placement import BY_EXPERT, check_divisible, param_specs
from atom_jax.trace.capture import MB_A, MB_B, micro_batch_scope


@dataclasses.dataclass(frozen=True)
class StepOptions:
    expert_mode: str = BY_EXPERT
    # None: TBO when a rank has at least `tbo_min_tokens` tokens (below that the split loses;
    # see atom_jax.scheduler.TBO_MIN_TOKENS for the measurements behind the default)
    tbo: bool | None = None
    tbo_min_tokens: int = TBO_MIN_TOKENS
    moe_backend: str = "ragged_dot"
    # cached attention (atom_jax.models.cached_attention): auto = jnp on CPU, Pallas kernels on GPU
    attn_backend: str = "auto"
    # True: route locally, gather (weights, ids); False: gather token ids, route gathered tokens
    gather_routing: bool = True
    output: str = "logits"  # "logits" [.., vocab] float32 or "hidden" (final normed hidden)

    def use_tbo(self, tokens_per_rank: int) -> bool:
        if self.tbo is None:
            return tokens_per_rank >= self.tbo_min_tokens
        return self.tbo


@dataclasses.dataclass
class _Chain:
    """One micro-batch: its segments of the rank block, flat token ids and mHC streams."""

    segments: tuple[Segment, ...]
    ids: jax.Array  # [T]
    streams: jax.Array  # [T, N, D]
    attn_in: Any = None  # per-segment attention inputs of the current layer (prefix source)
    mid: Any = None  # state between the attention half and the MoE half of a layer
    batch: Any = None  # cached step: this chain's slice of the packed buffer


def _as_u16(a):
    """[T, n] of any 16/32-bit dtype -> [T, n * itemsize / 2] uint16 (bit-exact)."""
    if a.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(a, jnp.uint16)
    return jax.lax.bitcast_convert_type(a, jnp.uint16).reshape(a.shape[0], -1)


def pack_rows(arrays):
    return jnp.concatenate([_as_u16(a) for a in arrays], axis=1)


def unpack_rows(packed, like):
    out, off = [], 0
    for a in like:
        width = a.shape[1] * a.dtype.itemsize // 2
        piece = packed[:, off: off + width]
        if a.dtype.itemsize == 4:
            piece = piece.reshape(piece.shape[0], a.shape[1], 2)
        out.append(jax.lax.bitcast_convert_type(piece, a.dtype))
        off += width
    return out


def _take(block, seg: Segment):
    return block[seg.row0: seg.row0 + seg.rows, seg.start: seg.start + seg.length]


class _RankStep:
    """The per-rank body; `model` holds this rank's parameter shards."""

    def __init__(self, model: DeepseekV4, opts: StepOptions, dp: int):
        self.model, self.opts, self.dp = model, opts, dp
        self.cfg = model.cfg

    # ---- attention half ------------------------------------------------------------------
    def attention(self, layer: int, block: Block, chain: _Chain, other: _Chain | None):
        post, comb, x = block.attn_in(chain.streams)
        streams = hc_merge(chain.streams, self.attend_chain(layer, block, chain, other, x), post, comb)
        post, comb, x = block.ffn_in(streams)
        mid = {"streams": streams, "post": post, "comb": comb, "x": x}
        if self.opts.gather_routing:
            mid["weights"], mid["idx"] = block.ffn.route(x, chain.ids)
        chain.mid = mid

    def attend_chain(self, layer: int, block: Block, chain: _Chain, other: _Chain | None, x):
        """Full-sequence attention per segment; a segment continuing a row the other chain
        started reads that chain's attention input of this layer as its prefix."""
        outs, attn_in, off = [], {}, 0
        for seg in chain.segments:
            xs = x[off: off + seg.tokens].reshape(seg.rows, seg.length, -1)
            pos = jnp.broadcast_to(seg.start + jnp.arange(seg.length), (seg.rows, seg.length))
            prefix = other.attn_in[(seg.row0, seg.start)] if seg.start > 0 else None
            attn_in[(seg.row0, seg.start + seg.length)] = xs
            outs.append(block.attn(xs, pos, prefix).reshape(seg.tokens, -1))
            off += seg.tokens
        chain.attn_in = attn_in
        return jnp.concatenate(outs, axis=0)

    # ---- MoE pieces ------------------------------------------------------------------------
    def dispatch(self, chain: _Chain):
        """One all-gather per chain and layer: tokens and their routing travel packed together."""
        mid = chain.mid
        extras = [mid["weights"], mid["idx"]] if self.opts.gather_routing else [chain.ids[:, None]]
        packed = jax.lax.all_gather(pack_rows([mid["x"], *extras]), DP, axis=0, tiled=True)
        parts = unpack_rows(packed, [mid["x"], *extras])
        if self.opts.gather_routing:
            return {"x": parts[0], "weights": parts[1], "idx": parts[2]}
        return {"x": parts[0], "ids": parts[1][:, 0]}

    def experts(self, block: Block, gathered):
        if "weights" in gathered:
            weights, idx = gathered["weights"], gathered["idx"]
        else:
            weights, idx = block.ffn.route(gathered["x"], gathered["ids"])
        offset = 0
        if self.opts.expert_mode == BY_EXPERT:
            offset = jax.lax.axis_index(DP) * (self.cfg.n_routed_experts // self.dp)
        return block.ffn.routed(gathered["x"], weights, idx, expert_offset=offset, backend=self.opts.moe_backend)

    def combine(self, partial):
        return jax.lax.psum_scatter(partial, DP, scatter_dimension=0, tiled=True)

    def finish(self, block: Block, chain: _Chain, reduced):
        mid = chain.mid
        y = reduced + block.ffn.shared(mid["x"])
        chain.streams = hc_merge(mid["streams"], y, mid["post"], mid["comb"])
        chain.mid = None

    # ---- schedules ------------------------------------------------------------------------
    def run_one_chain(self, chain: _Chain):
        for i, block in enumerate(self.model.layers):
            self.attention(i, block, chain, None)
            self.finish(block, chain, self.combine(self.experts(block, self.dispatch(chain))))

    def run_two_chains(self, a: _Chain, b: _Chain):
        barrier = jax.lax.optimization_barrier
        # Named scopes put "mb_a" / "mb_b" into each op's metadata, so profiler traces can tell
        # the chains apart (`python -m atom_jax.trace report / plot`).
        in_a, in_b = (lambda: micro_batch_scope(MB_A)), (lambda: micro_batch_scope(MB_B))
        layers = list(self.model.layers)
        with in_a():
            self.attention(0, layers[0], a, None)
        # Make attn(B) of layer 0 wait for attn(A), as later layers' do (through the RS(B)
        # barrier): otherwise XLA runs it first and AG(A) of layer 0 has nothing to hide behind.
        a.mid, b.streams = barrier((a.mid, b.streams))
        for i, block in enumerate(layers):
            with in_a():
                ga = self.dispatch(a)
            with in_b():
                self.attention(i, block, b, a)  # attn(B) || AG(A)
            ga, b.mid = barrier((ga, b.mid))
            with in_a():
                pa = self.experts(block, ga)
            with in_b():
                gb = self.dispatch(b)  # MoE(A) || AG(B)
            pa, gb = barrier((pa, gb))
            with in_a():
                ra = self.combine(pa)
            with in_b():
                pb = self.experts(block, gb)  # RS(A) || MoE(B)
            ra, pb = barrier((ra, pb))
            with in_a():
                self.finish(block, a, ra)
            with in_b():
                rb = self.combine(pb)
            if i + 1 < len(layers):  # RS(B) || attn(A, next layer)
                with in_a():
                    self.attention(i + 1, layers[i + 1], a, b)
                rb, a.mid = barrier((rb, a.mid))
            with in_b():
                self.finish(block, b, rb)

    def __call__(self, ids):
        rows, seq = ids.shape
        tbo = self.opts.use_tbo(rows * seq) and rows * seq >= 2
        seg_sets = split_two(rows, seq) if tbo else (whole(rows, seq),)
        chains = []
        for segs in seg_sets:
            flat = jnp.concatenate([_take(ids, s).reshape(-1) for s in segs])
            chains.append(_Chain(segs, flat, self.model.embed_streams(flat)))
        if tbo:
            self.run_two_chains(*chains)
        else:
            self.run_one_chain(chains[0])
        return self.assemble(chains, rows, seq)

    def assemble(self, chains, rows, seq):
        m = self.model
        width = self.cfg.vocab_size if self.opts.output == "logits" else self.cfg.hidden_size
        out = jnp.zeros((rows, seq, width), jnp.float32 if self.opts.output == "logits" else m.dtype)
        for chain in chains:
            if self.opts.output == "logits":
                vals = m.logits(chain.streams)
            else:
                vals = rms_norm(m.hc_head(chain.streams), m.norm[...], self.cfg.rms_norm_eps)
            off = 0
            for seg in chain.segments:
                piece = vals[off: off + seg.tokens].reshape(seg.rows, seg.length, width).astype(out.dtype)
                out = jax.lax.dynamic_update_slice(out, piece, (seg.row0, seg.start, 0))
                off += seg.tokens
        return out


def make_step(model: DeepseekV4, mesh, opts: StepOptions = StepOptions(), place: bool = True):
    """-> (step, params): `step(params, token_ids)` with token_ids [dp * rows, seq] sharded by
    rows over `dp`; returns [dp * rows, seq, vocab] logits (or hidden). `params` are the model's
    parameters placed on the mesh (experts sharded per `opts.expert_mode`); with `place=False`
    (an abstract model, e.g. for benchmarks that initialise on device) params is None."""
    dp = mesh.shape[DP]
    check_divisible(model.cfg, dp, opts.expert_mode, model.weights)
    graphdef, state = nnx.split(model)
    pure = state.to_pure_dict()
    specs = param_specs(pure, opts.expert_mode)
    params = None
    if place:
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), pure, specs)
    skeleton = abstract_model(model.cfg, model.dtype, with_mtp=len(model.mtp) > 0, weights=model.weights)

    def body(local_params, ids):
        st = nnx.split(skeleton)[1]
        nnx.replace_by_pure_dict(st, local_params)
        return _RankStep(nnx.merge(graphdef, st), opts, dp)(ids)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(specs, P(DP)), out_specs=P(DP), check_vma=False)
    return jax.jit(sharded), params


def random_params_on_mesh(cfg, mesh, opts: StepOptions, dtype=jnp.bfloat16, seed: int = 0, weights: str = BF16):
    """Random parameters created directly on the devices, already sharded (a V4-Flash layer is
    ~13 GB of experts: building it on the host first would not fit). `weights` "native" makes
    the packed FP4 / FP8 parameters directly (packed_params.random_leaf)."""
    model = abstract_model(cfg, dtype, weights=weights)
    pure = nnx.split(model)[1].to_pure_dict()
    specs = param_specs(pure, opts.expert_mode)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(pure)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    out = []
    for i, ((path, leaf), spec) in enumerate(zip(leaves_with_path, spec_leaves)):
        sharding = NamedSharding(mesh, spec)
        key = jax.random.fold_in(jax.random.key(seed), i)
        name = str(getattr(path[-1], "key", path[-1]))
        if leaf.dtype == jnp.uint8 or name.endswith(SCALE):
            make = lambda k, l=leaf, n=name: random_leaf(k, n, l.shape, l.dtype)  # noqa: E731
        elif jnp.issubdtype(leaf.dtype, jnp.integer):
            make = lambda k, l=leaf: jax.random.randint(k, l.shape, 0, cfg.n_routed_experts, l.dtype)  # noqa: E731
        elif leaf.ndim == 1:  # norms, biases, sinks: ones / small values
            make = lambda k, l=leaf: (1.0 + 0.02 * jax.random.normal(k, l.shape)).astype(l.dtype)  # noqa: E731
        else:
            make = lambda k, l=leaf: (0.02 * jax.random.normal(k, l.shape)).astype(l.dtype)  # noqa: E731
        out.append(jax.jit(make, out_shardings=sharding)(key))
    return model, jax.tree.unflatten(treedef, out)


def shard_tokens(ids, mesh):
    return jax.device_put(jnp.asarray(ids, jnp.int32), NamedSharding(mesh, P(DP)))
