"""The on-device sampler the compiled step runs: greedy, temperature, top-k, top-p,
per-request seeds; logprob of the chosen token (from the model's unscaled distribution).
The per-request parameters it reads are `atom_jax.scheduler.sampling_params.SamplingParams`.

No sort of the vocabulary (issue 27: a segmented radix sort of [S, 129280] f32 was ~1 ms of
each decode step at 128 rows per rank): the top-k and top-p cut values are found by a radix
select over the order-preserving u32 keys of the scaled logits: 2 x 32 / RADIX_BITS passes,
each one variadic reduction over the vocabulary (per 512-token chunk, then over the chunks),
with no scatter, no sort, no data-dependent loop or conditional (the step program stays
launchable without waiting on the device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atom_jax.kernels.platform import is_cpu

RADIX_BITS = 4  # key bits resolved per pass: 32 / RADIX_BITS passes of 2**RADIX_BITS - 1 thresholds each
# Row sums in two levels (per _CHUNK, then over the chunks: two reductions a pass) or one (the whole
# row: one reduction, so one kernel a pass on a GPU instead of two). None: two on the CPU, where XLA
# sums a row sequentially (129K f32 terms drift by ~1e-3), and on GPUs until `bench sampler`
# measures one level there (a GPU reduces a row as a tree). Both read at trace time.
SUM_LEVELS: int | None = None


def ordered_keys(x):
    """f32 [...] -> u32 [...] with the same order: a < b iff key(a) < key(b), and equal floats
    (-0.0 and +0.0 included) get equal keys; where XLA flushes subnormals to zero (CPU) they
    key as zero, as they compare. (NaN is not expected: it keys above +inf or below -inf.)"""
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 == +0.0, one key for both
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(u >= jnp.uint32(1 << 31), ~u, u | jnp.uint32(1 << 31))


_CHUNK = 512  # the vocabulary is summed in chunks of this many, then over the chunks


def _chunked(x):
    """[S, V] -> [S, C, L], zero-padded: sums over a row are taken chunk by chunk (L = _CHUNK),
    then over the chunks; with SUM_LEVELS 1, one chunk of the whole row (C = 1, L = V)."""
    s, v = x.shape
    if (SUM_LEVELS or 2) == 1:
        return x.reshape(s, 1, v)
    c = -(-v // _CHUNK)
    return jnp.pad(x, ((0, 0), (0, c * _CHUNK - v))).reshape(s, c, _CHUNK)


def _sum_rows(ops):
    """list of [S, C, L] -> list of [S] row sums: one variadic reduction over L, one over C
    (none where C = 1)."""
    zeros = [jnp.zeros((), o.dtype) for o in ops]
    add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
    sums = jax.lax.reduce(ops, zeros, add, (2,))
    return [x[:, 0] for x in sums] if ops[0].shape[1] == 1 else jax.lax.reduce(sums, zeros, add, (1,))


def _radix_select(keys, weights, target):
    """keys [S, C, L] u32, weights [S, C, L] >= 0 (zero on the padding), target [S] -> per row
    the largest u32 t with sum(weights[keys >= t]) >= target (the sum falls as t grows, so t is
    then a key of the row), or 0 where even the row's total is below the target. RADIX_BITS of
    t per pass, from the top: each pass sums at the 2**RADIX_BITS - 1 candidate digits above
    the current prefix in one variadic reduction (the row is read once for all of them) and
    keeps the largest digit that reaches the target (the sums fall with the digit, so that is
    the count of digits reaching it)."""
    zero = jnp.zeros((), weights.dtype)

    def one_pass(i, t):
        shift = jnp.uint32(32 - RADIX_BITS) - jnp.uint32(RADIX_BITS) * i.astype(jnp.uint32)
        cands = [t + (jnp.uint32(d) << shift) for d in range(1, 1 << RADIX_BITS)]
        sums = _sum_rows([jnp.where(keys >= c[:, None, None], weights, zero) for c in cands])
        digit = sum((s >= target).astype(jnp.uint32) for s in sums)  # elementwise on the reduction's outputs
        return t + (digit << shift)

    # A static trip count (a scan: no host sync). Unrolled on a GPU, so every pass's kernels
    # stay in the step's command buffer (no loop the host steps through); rolled on the CPU,
    # where compiling one pass instead of 8 keeps each step program's compile ~0.5 s shorter.
    return jax.lax.fori_loop(0, 32 // RADIX_BITS, one_pass, jnp.zeros(keys.shape[:1], jnp.uint32), unroll=not is_cpu())


def support_mask(scaled, top_k, top_p):
    """scaled [S, V] f32 (logits / temperature), top_k [S] i32 (0 = off), top_p [S] f32 in (0, 1]
    -> bool [S, V]: the tokens a draw may pick.

    Top-k keeps every value >= the k-th largest (ties included). Top-p then applies to the
    softmax over the top-k set: it keeps the smallest prefix, in descending order, whose mass
    reaches top_p (the largest value always; ties at the cut value included), i.e. every value
    >= the largest cut c whose mass of values >= c is >= top_p; top_p >= 1 keeps the whole
    top-k set.

    Rounding: the masses here are f32 sums of exp(scaled - max) over the kept tokens (chunk by
    chunk, then over the chunks) compared with top_p times their total, where the sorted
    implementation this replaced compared an f32 cumulative sum of normalized probabilities
    in descending order. Both equal the exact rule up to f32 rounding, so they (and a float64
    oracle) can disagree only in rows where the mass of the values >= some tie group's value
    lies within that rounding of top_p (~1e-6 at 129K terms): one side keeps that group, the
    other does not. One deliberate difference: top_p >= 1 keeps every top-k token here, where
    the cumulative sum could reach 1.0 before the row's tail (its mass rounding away) and
    drop that tail."""
    v = scaled.shape[-1]
    keys = ordered_keys(scaled)
    chunks = _chunked(keys)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = _radix_select(chunks, _chunked(jnp.ones(scaled.shape, jnp.int32)), k)  # count(keys >= kth) >= k
    top = jnp.max(scaled, axis=-1)
    mass = _chunked(jnp.where(keys >= kth[:, None], jnp.exp(scaled - top[:, None]), 0.0))
    (total,) = _sum_rows([mass])
    cut = _radix_select(chunks, mass, top_p * total)
    cut = jnp.where(top_p >= 1, kth, jnp.maximum(cut, kth))
    cut = jnp.minimum(cut, ordered_keys(top))  # the largest value always stays
    return keys >= cut[:, None]


def sample_tokens(logits, temperature, top_k, top_p, seeds, counters):
    """logits [S, V] f32; temperature/top_p [S] f32; top_k [S] i32 (0 = off); seeds/counters
    [S] u32 (key = fold_in(key(seed), counter): a request's draws don't depend on its batch).
    -> (tokens [S] i32, logprobs [S] f32). Temperature 0 is greedy (argmax of the logits);
    otherwise a draw from softmax(logits / temperature) restricted to `support_mask`."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    masked = jnp.where(support_mask(scaled, top_k, top_p), scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = jnp.where(temperature <= 0, greedy, drawn).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
