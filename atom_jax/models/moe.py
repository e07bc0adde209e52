"""DeepSeek-V4 MoE: sqrt-softplus router (learned or token-id hashed), routed experts through
the grouped-GEMM seam, one shared expert; SwiGLU clamped at `swiglu_limit`."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.kernels import grouped_gemm
from atom_jax.models import packed_params as pp
from atom_jax.models.layers import normal_param, swiglu_clamped
from atom_jax.models.trace_once import traced_once
from atom_jax.weights import formats


class Table(nnx.Variable):
    """A frozen integer lookup table (the hash router's token-id -> expert-id map)."""


def router_scores(x, gate_w):
    logits = jnp.dot(x.astype(jnp.float32), gate_w.astype(jnp.float32))
    return jnp.sqrt(jax.nn.softplus(logits))


def normalise_weights(scores, idx, cfg: ModelConfig):
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor


def mean_rows_per_expert(tokens: int, top_k: int, n_experts: int) -> float:
    """Average rows per expert of a routed call: its (token, choice) pairs over the experts."""
    return tokens * top_k / n_experts


def routed_experts(x, idx, weights, w1, w3, w2, limit, expert_offset=0, backend="ragged_dot", n_experts=None):
    """Sum over each token's chosen experts that live in [expert_offset, expert_offset + E_local).

    x [N, D]; idx/weights [N, k]; w1/w3 [E_local, D, I]; w2 [E_local, I, D] (dense, `DenseKMajor`,
    or packed `Fp4Weights` / `Fp4WeightsKMajor` of those shapes: the seam runs them W4A16). Choices of experts
    held elsewhere contribute nothing (sorted past the last group, weight zeroed).

    Route: the N * k (token, choice) pairs sorted by local expert (stable); the first GEMMs take
    the token ids of the sorted rows (`row_ids`): the kernels that can load x[token] themselves,
    the others gather in XLA. Unroute: a gather, not a scatter: token t sums, in float32, its
    choices' rows of the sorted output, each found through the inverse permutation; choices of
    other ranks' experts add zeros (selected, not multiplied by a zero weight). No value of a row
    past the last group is used (the w2 kernel does not load them; the unroute's fill-mode gather
    may read one, clamped, and selects 0), so the kernels that can leave them unwritten
    (`zero_tail=False`). The SwiGLU is the w3 GEMM's epilogue: on the float32 product in the
    Pallas / W4A16 kernels, on the product rounded to x's dtype for the other backends; where
    `grouped_gemm.fused_gate_up`, the w1 and w3 GEMMs are one Pallas kernel (same values)."""
    gemm = grouped_gemm.get(backend)
    n, k = idx.shape
    e_local = w1.shape[0]
    order, inv, valid, sizes = sort_by_expert(idx, expert_offset, e_local)
    token = (order // k).astype(jnp.int32)
    mean = mean_rows_per_expert(n, k, n_experts or e_local)  # for capacity backends and the seam's path choice
    swiglu = functools.partial(swiglu_clamped, limit=limit)  # h = swiglu(x w1, x w3), in the w3 GEMM (or the pair's)
    h = grouped_gemm.gate_up(backend, x, w1, w3, sizes, swiglu, mean_group=mean, row_ids=token, zero_tail=False)
    y = gemm(h, w2, sizes, mean_group=mean, zero_tail=False)  # [N * k, D], sorted order
    return unroute(y, inv, valid.reshape(n, k), weights, x.dtype)


# Up to this many (token, choice) pairs the route is ranked by comparisons instead of sorted
# (`sort_by_expert`): decode steps (dp x tokens per rank x k: 768 at 64 tokens per rank, dp=2,
# top-6). A GPU sort is several kernels (XLA's sort, or cub's radix sort: ~1 ms of a 4-layer
# decode step at 64 sequences per rank on an H200, docs/design.md), plus a scatter for the
# inverse permutation and one for the group sizes; the comparisons are three fused
# compare-and-count reductions over [M, M] (16.7M int32 compares at the limit).
RANK_ROUTE_MAX = 4096
RANK_ROUTE_ENV = "ATOM_JAX_RANK_ROUTE_MAX"  # overrides it when set (0: always sort; read when traced)


def rank_route_max() -> int:
    """$ATOM_JAX_RANK_ROUTE_MAX if set (an int >= 0), else RANK_ROUTE_MAX."""
    value = os.environ.get(RANK_ROUTE_ENV)
    if value is None or value == "":
        return RANK_ROUTE_MAX
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"${RANK_ROUTE_ENV}={value!r}: an int >= 0 (0: always sort the route)")
    return n


def sort_by_expert(idx, expert_offset: int, e_local: int, rank_max: int | None = None):
    """The route: the N * k (token, choice) pairs of idx [N, k] sorted, stably, by local expert
    (experts [expert_offset, expert_offset + e_local)); choices of experts held elsewhere sort
    past the last group. -> (order [N * k]: sorted position -> flat choice index t * k + j,
    inv [N * k]: its inverse (flat choice index -> sorted position), valid [N * k] bool: the
    choice is local, sizes [e_local]: rows per local expert).

    Up to `rank_max` pairs (default `rank_route_max()`: RANK_ROUTE_MAX or $ATOM_JAX_RANK_ROUTE_MAX) without a sort or a scatter: each pair's
    sorted position is the count of pairs before it in (key, index) order, the permutation and
    the group sizes are compare-and-count reductions too; the same permutation as the stable
    sort (integers: exactly equal)."""
    local = idx.reshape(-1) - expert_offset
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local).astype(jnp.int32)
    m = key.shape[0]
    i = jnp.arange(m, dtype=jnp.int32)
    if m <= (rank_route_max() if rank_max is None else rank_max):
        before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (i[None, :] < i[:, None]))
        inv = jnp.sum(before, axis=1, dtype=jnp.int32)
        order = jnp.sum(jnp.where(inv[None, :] == i[:, None], i[None, :], 0), axis=1, dtype=jnp.int32)
        sizes = jnp.sum(key[None, :] == jnp.arange(e_local, dtype=jnp.int32)[:, None], axis=1, dtype=jnp.int32)
        return order, inv, valid, sizes
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    # the inverse permutation: a scatter of N * k int32 (not of rows)
    inv = jnp.zeros((m,), jnp.int32).at[order].set(i, unique_indices=True)
    return order, inv, valid, jnp.bincount(key, length=e_local + 1)[:e_local]


def unroute(y, inv, valid, weights, dtype):
    """out[t] = sum_j weights[t, j] * y[inv[t * k + j]] over t's valid choices j, float32
    accumulation, in `dtype`. y [N * k, D] in sorted order; inv [N * k] the sorted position of
    each flat choice index t * k + j (`sort_by_expert`); valid/weights [N, k].

    Each output row reads its k rows of y; an invalid choice's index is out of range and
    `mode="fill"` gives 0 there (a select after a clamped read: keep it a select, as y's rows
    past the last group may be unwritten garbage, NaN included, which a multiply by a zero
    weight would let through)."""
    n, k = valid.shape
    m = inv.shape[0]
    inv = inv.reshape(n, k)
    w = jnp.where(valid, weights, 0.0).astype(jnp.float32)
    out = jnp.zeros((n, y.shape[-1]), jnp.float32)
    for j in range(k):  # k terms, each a row gather fused into one loop with the sum
        rows = jnp.take(y, jnp.where(valid[:, j], inv[:, j], m), axis=0, mode="fill", fill_value=0)
        out = out + w[:, j, None] * rows.astype(jnp.float32)
    return out.astype(dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, is_hash: bool, rngs: nnx.Rngs, dtype=jnp.float32, weights: str = formats.BF16,
                 expert_layout: str = formats.NMAJOR):
        self.cfg = cfg
        self.is_hash = is_hash
        # kmajor: the routed experts [E, N, K] (FP4 codes [E, N, K/2]), the checkpoint's [out, in]
        self.expert_layout = formats.model_layout(weights, expert_layout)
        k_major = self.expert_layout == formats.KMAJOR
        d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        si = i * cfg.n_shared_experts
        self.gate_w = normal_param(rngs, (d, e), dtype)
        if is_hash:
            self.tid2eid = Table(jax.vmap(lambda kk: jax.random.permutation(kk, e)[: cfg.num_experts_per_tok])(
                jax.random.split(rngs.params(), cfg.vocab_size)).astype(jnp.int32))
        else:
            self.gate_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        for name, (k, n) in {"w1": (d, i), "w3": (d, i), "w2": (i, d)}.items():
            if formats.packed_experts(weights):  # FP4 codes + ue8m0 scales (packed_params)
                codes, scales = pp.fp4_stack(rngs, e, k, n, k_major)
                setattr(self, name, codes)
                setattr(self, name + pp.SCALE, scales)
            else:
                setattr(self, name, normal_param(rngs, (e, n, k) if k_major else (e, k, n), dtype))
        # the shared expert's gate and up projections: one fused parameter (packed_params.FUSED)
        pp.fused_matrix(self, "s_w13", rngs, d, dtype, formats.packed_dense(weights))
        if formats.packed_dense(weights):  # FP8 codes [out, in] + block scales
            self.s_w2, self.s_w2_scale = pp.fp8_matrix(rngs, si, d)
        else:
            self.s_w2 = normal_param(rngs, (si, d), dtype)

    @traced_once
    def route(self, x, token_ids):
        """x [N, D] -> (weights [N, k] float32, expert ids [N, k] int32)."""
        scores = router_scores(x, self.gate_w[...])
        if self.is_hash:
            idx = self.tid2eid[...][token_ids]
        else:
            _, idx = jax.lax.top_k(scores + self.gate_bias[...], self.cfg.num_experts_per_tok)
        idx = idx.astype(jnp.int32)
        return normalise_weights(scores, idx, self.cfg), idx

    @traced_once
    def shared(self, x):
        gate, up = pp.fused_linear(x, self, "s_w13")
        h = swiglu_clamped(gate, up, self.cfg.swiglu_limit)
        return pp.linear(h, self, "s_w2")

    def expert_stacks(self) -> tuple:
        """(w1, w3, w2): the routed experts' grouped-GEMM operands (dense [E, K, N], `DenseKMajor`
        [E, N, K] when kmajor, or packed FP4)."""
        return tuple(pp.expert_weights(self, w) for w in pp.FP4_EXPERTS)

    def rows_per_expert(self, tokens: int) -> float:
        """Mean rows per expert of a routed call over `tokens` tokens (`routed_experts`' mean_group)."""
        return mean_rows_per_expert(tokens, self.cfg.num_experts_per_tok, self.cfg.n_routed_experts)

    @traced_once
    def decode_stacks(self, stacks, rows_per_expert: float, backend: str, dtype):
        """`stacks` (w1, w3, w2) with the FP4 ones the grouped-GEMM seam would decode for routed
        calls of `rows_per_expert` rows per expert decoded now (`grouped_gemm.decode_ahead`), so
        several calls share one decode; -> None where the seam would not decode them first."""
        out = [grouped_gemm.decode_ahead(backend, w, rows_per_expert, dtype) for w in stacks]
        return None if any(w is None for w in out) else tuple(out)

    @traced_once
    def routed(self, x, weights, idx, expert_offset=0, backend="ragged_dot", stacks=None):
        """`stacks`: the (w1, w3, w2) operands to use instead of the module's own (`decode_stacks`)."""
        stacks = self.expert_stacks() if stacks is None else stacks
        return routed_experts(x, idx, weights, *stacks, self.cfg.swiglu_limit, expert_offset, backend,
                              self.cfg.n_routed_experts)

    def __call__(self, x, token_ids, backend="ragged_dot"):
        """x [N, D], token_ids [N] -> [N, D]."""
        weights, idx = self.route(x, token_ids)
        return self.routed(x, weights, idx, backend=backend) + self.shared(x)
