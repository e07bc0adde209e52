"""The per-rank layer loop shared by the full-sequence step (step.py) and the engine's cached
step (cached_step.py): attention half, MoE dispatch / experts / combine, and the two schedules.

Attention runs per rank on the rank's own tokens; the MoE gathers every rank's tokens with
`all_gather(tiled=True)`, computes the experts this rank holds, and returns each rank its own
tokens summed over ranks with `psum_scatter(tiled=True)`. The shared expert runs locally.

Two-batch overlap (TBO): the rank's tokens are cut into two micro-batch chains, A and B,
interleaved per layer with `optimization_barrier` so that each collective of one chain has the
other chain's compute to hide behind (docs/design.md, "two-batch overlap"):
    attn(A) | AG(A) || attn(B) | MoE(A) || AG(B) | RS(A) || MoE(B) | RS(B) || attn(A, next layer)
That "split" schedule runs each chain's expert GEMM on its own, so every local expert's weights
are read twice per layer and each chain pads its rows to the kernel's row tiles; the "fused"
schedule (`StepOptions.tbo_schedule`) runs one expert GEMM over both chains' rows instead and
hides AG(B) and RS(A) behind the shared experts (`_fused_moe`).

Whether a step uses TBO is decided by the host scheduler (`StepPlan.tbo`); the compiled steps
take it as a static bool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from atom_jax.kernels.packed import FP4_TYPES
from atom_jax.models.deepseek_v4 import Block, DeepseekV4
from atom_jax.models.hyper import hc_merge
from atom_jax.sharding.mesh import DP
from atom_jax.sharding.placement import BY_EXPERT
from atom_jax.trace.capture import MB_A, MB_B, layer_scope, micro_batch_scope


TBO_SCHEDULES = ("split", "fused")


# Named scopes put "mb_a" / "mb_b" into each op's metadata, so profiler traces can tell the
# chains apart (`python -m atom_jax.trace report / plot`).
def _in_a():
    return micro_batch_scope(MB_A)


def _in_b():
    return micro_batch_scope(MB_B)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a compiled step is built (not what it runs: the TBO choice is a call argument)."""

    expert_mode: str = BY_EXPERT
    moe_backend: str = "ragged_dot"
    # cached attention (atom_jax.models.cached_attention): auto = jnp on CPU, Pallas kernels on GPU
    attn_backend: str = "auto"
    # True: route locally, gather (weights, ids); False: gather token ids, route gathered tokens
    gather_routing: bool = True
    output: str = "logits"  # "logits" [.., vocab] float32 or "hidden" (final normed hidden)
    # the two-chain schedule when a step runs with TBO: "split" (each chain its own expert GEMM)
    # or "fused" (one expert GEMM over both chains' rows: expert weights read once per layer)
    tbo_schedule: str = "split"
    # trace each layer kind once (models/trace_once.py: the layer's pieces as nested jits that
    # XLA inlines again; same compiled program); False: every layer traced anew
    trace_layers_once: bool = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerMid:
    """A chain's state between the attention half and the MoE half of one layer."""

    streams: jax.Array  # [T, N, D] mHC streams after attention
    post: jax.Array
    comb: jax.Array
    x: jax.Array  # [T, D] the FFN input
    weights: jax.Array | None = None  # routing, when computed before the gather
    idx: jax.Array | None = None


@dataclasses.dataclass
class Chain:
    """One micro-batch: flat token ids and mHC streams, plus what its step kind needs."""

    ids: jax.Array  # [T]
    streams: jax.Array  # [T, N, D]
    mid: LayerMid | None = None
    context: Any = None  # per step kind: the full-sequence step's segments, the cached step's batch slice
    # the finished layer's merge operands (streams, output, post, comb): the next layer's attention
    # merges them with its own mHC in one call (Block.attn_in_after), in its own layer scope; after the
    # last layer, `final_streams` merges them (the cached step: only the rows it samples). None: the
    # streams are current.
    pending: tuple | None = None


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


class RankStep:
    """The per-rank body; `model` holds this rank's parameter shards. Subclasses say how a
    chain attends (`attend_chain`) and how a step's tokens become chains."""

    def __init__(self, model: DeepseekV4, opts: StepOptions, dp: int):
        self.model, self.opts, self.dp = model, opts, dp
        self.cfg = model.cfg

    # ---- attention half ------------------------------------------------------------------
    def attend_chain(self, layer: int, block: Block, chain: Chain, other: Chain | None, x):
        raise NotImplementedError

    def attention(self, layer: int, block: Block, chain: Chain, other: Chain | None):
        if chain.pending is None:
            post, comb, x = block.attn_in(chain.streams)
        else:  # the previous layer's output merged, with this layer's attention mHC
            chain.streams, post, comb, x = block.attn_in_after(*chain.pending)
            chain.pending = None
        out = self.attend_chain(layer, block, chain, other, x)
        streams, post, comb, x = block.ffn_in_after(chain.streams, out, post, comb)
        mid = LayerMid(streams, post, comb, x)
        if self.opts.gather_routing:
            mid.weights, mid.idx = block.ffn.route(x, chain.ids)
        chain.mid = mid

    # ---- MoE pieces ------------------------------------------------------------------------
    def dispatch(self, chain: Chain):
        """One all-gather per chain and layer: tokens and their routing travel packed together."""
        mid = chain.mid
        extras = [mid.weights, mid.idx] if self.opts.gather_routing else [chain.ids[:, None]]
        packed = jax.lax.all_gather(pack_rows([mid.x, *extras]), DP, axis=0, tiled=True)
        parts = unpack_rows(packed, [mid.x, *extras])
        if self.opts.gather_routing:
            return {"x": parts[0], "weights": parts[1], "idx": parts[2]}
        return {"x": parts[0], "ids": parts[1][:, 0]}

    def experts(self, block: Block, gathered, stacks=None):
        """`stacks`: the layer's expert operands decoded ahead (`decoded_stacks`), else None."""
        if "weights" in gathered:
            weights, idx = gathered["weights"], gathered["idx"]
        else:
            weights, idx = block.ffn.route(gathered["x"], gathered["ids"])
        return block.ffn.routed(gathered["x"], weights, idx, expert_offset=self.expert_offset(),
                                backend=self.opts.moe_backend, stacks=stacks)

    def decoded_stacks(self, block: Block, ga):
        """The layer's FP4 experts decoded once for both chains' expert GEMMs, where the grouped-GEMM
        seam would decode them for each chain's call anyway (prefill-sized chains: from
        DEQUANT_MIN_ROWS_PER_GROUP rows per expert), else None (each call as without TBO).
        `ga`: the gathered rows of the first call that uses them (the fused schedule: both
        chains' rows, its one call).
        Left to the seam, each chain would decode its own copy, or XLA would merge the two
        decodes and place them where it likes: a layer's decoded experts (V4-Flash at dp=2: 3 x
        2 GiB) from several layers live at once, the TBO step's temporaries then far above the
        base step's (issue 20). Here the decode waits for chain A's gathered rows (an
        optimization barrier), so one layer's decoded experts live at a time: from MoE(A) to MoE(B)."""
        ffn = block.ffn
        stacks = ffn.expert_stacks()
        if not any(isinstance(w, FP4_TYPES) for w in stacks):  # dense experts: nothing to decode
            return None
        stacks, _ = jax.lax.optimization_barrier((stacks, ga["x"]))
        return ffn.decode_stacks(stacks, ffn.rows_per_expert(ga["x"].shape[0]), self.opts.moe_backend,
                                 jnp.dtype(ga["x"].dtype))

    def expert_offset(self):
        """Index of this rank's first expert (0 when every rank holds a slice of every expert)."""
        if self.opts.expert_mode != BY_EXPERT:
            return 0
        return jax.lax.axis_index(DP) * (self.cfg.n_routed_experts // self.dp)

    def combine(self, partial):
        return jax.lax.psum_scatter(partial, DP, scatter_dimension=0, tiled=True)

    def finish(self, block: Block, chain: Chain, reduced, shared=None):
        """`shared`: the shared expert's output for this chain if already computed. The merge into
        the streams waits in `Chain.pending` for the next layer's attention (or `final_streams`)."""
        mid = chain.mid
        y = reduced + (block.ffn.shared(mid.x) if shared is None else shared)
        chain.streams, chain.pending = None, (mid.streams, y, mid.post, mid.comb)
        chain.mid = None

    @staticmethod
    def final_streams(chains: list[Chain], rows=None):
        """The streams after the last layer, the chains' rows concatenated: its merge, for `rows`
        of them only when given (the cached step samples one row per chunk)."""
        parts = [jnp.concatenate([c.pending[i] for c in chains], axis=0) for i in range(4)]
        return hc_merge(*(parts if rows is None else [p[rows] for p in parts]))

    # ---- schedules ------------------------------------------------------------------------
    def run_one_chain(self, chain: Chain):
        for i, block in enumerate(self.model.layers):
            with layer_scope(i):
                self.attention(i, block, chain, None)
                self.finish(block, chain, self.combine(self.experts(block, self.dispatch(chain))))

    def run_two_chains(self, a: Chain, b: Chain):
        """The overlapped schedule; the MoE half of each layer per `opts.tbo_schedule`
        (`_split_moe` or `_fused_moe`)."""
        barrier = jax.lax.optimization_barrier
        moe = self._fused_moe if self.opts.tbo_schedule == "fused" else self._split_moe
        layers = list(self.model.layers)
        with layer_scope(0), _in_a():
            self.attention(0, layers[0], a, None)
        # Make attn(B) of layer 0 wait for attn(A), as later layers' do (through the RS(B)
        # barrier): otherwise XLA runs it first and AG(A) of layer 0 has nothing to hide behind.
        a.mid, b.streams = barrier((a.mid, b.streams))
        for i, block in enumerate(layers):
            with layer_scope(i):
                with _in_a():
                    ga = self.dispatch(a)
                with _in_b():
                    self.attention(i, block, b, a)  # attn(B) || AG(A)
                ga, b.mid = barrier((ga, b.mid))
                ra, pb, sa, sb = moe(block, a, b, ga)
                with _in_a():
                    self.finish(block, a, ra, sa)
                with _in_b():
                    rb = self.combine(pb)
            if i + 1 < len(layers):  # RS(B) || attn(A, next layer)
                with layer_scope(i + 1), _in_a():
                    self.attention(i + 1, layers[i + 1], a, b)
                rb, a.mid = barrier((rb, a.mid))
            with layer_scope(i), _in_b():
                self.finish(block, b, rb, sb)

    def _split_moe(self, block: Block, a: Chain, b: Chain, ga):
        """Each chain its own expert GEMM: MoE(A) || AG(B), then RS(A) || MoE(B).
        -> (A reduced, B's partial sums, None, None)."""
        barrier = jax.lax.optimization_barrier
        stacks = self.decoded_stacks(block, ga)
        with _in_a():
            pa = self.experts(block, ga, stacks)
        with _in_b():
            gb = self.dispatch(b)  # MoE(A) || AG(B)
        pa, gb = barrier((pa, gb))
        with _in_a():
            ra = self.combine(pa)
        with _in_b():
            # (chain B takes A's decode for the same rows per expert: the same decision)
            same = gb["x"].shape[0] == ga["x"].shape[0]
            pb = self.experts(block, gb, stacks if same else None)  # RS(A) || MoE(B)
        ra, pb = barrier((ra, pb))
        return ra, pb, None, None

    def _fused_moe(self, block: Block, a: Chain, b: Chain, ga):
        """TBO that keeps expert-weight reuse: ONE grouped GEMM over both chains' gathered rows
        (each local expert's weights read once, rows per expert as without TBO); AG(B) and
        RS(A) hide behind the shared experts:
            AG(B) || shared(A) | MoE(A+B) | RS(A) || shared(B)
        Against "split": no second weight read or row-tile padding per chain; AG(B) and RS(A)
        hide only behind a shared expert (a sixth of the routed work at top-6).
        -> (A reduced, B's partial sums, A's shared expert, B's shared expert)."""
        barrier = jax.lax.optimization_barrier
        with _in_b():
            gb = self.dispatch(b)
        with _in_a():
            sa = block.ffn.shared(a.mid.x)  # shared(A) || AG(B)
        gb, sa = barrier((gb, sa))
        rows = ga["x"].shape[0]
        both = {k: jnp.concatenate([ga[k], gb[k]]) for k in ga}
        partial = self.experts(block, both, self.decoded_stacks(block, both))
        with _in_a():
            ra = self.combine(partial[:rows])
        with _in_b():
            sb = block.ffn.shared(b.mid.x)  # shared(B) || RS(A)
        ra, sb = barrier((ra, sb))
        return ra, partial[rows:], sa, sb

    def run(self, chains: list[Chain]) -> None:
        """One chain: the plain layer loop; two: the overlapped schedule (opts.tbo_schedule)."""
        if len(chains) == 2:
            if self.opts.tbo_schedule not in TBO_SCHEDULES:
                raise ValueError(f"tbo_schedule {self.opts.tbo_schedule!r}; choose from {TBO_SCHEDULES}")
            self.run_two_chains(*chains)
        else:
            self.run_one_chain(chains[0])
