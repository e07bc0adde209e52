"""On-device sampling: greedy, top-k / top-p supports, seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.bench.sampler import sorted_sampler
from atom_jax.engine.sampler import sample_tokens
from atom_jax.kernels.platform import lowering_for


def _draw(logits, t, k, p, seeds, counters):
    s = logits.shape[0]
    toks, lps = jax.jit(sample_tokens)(jnp.asarray(logits, jnp.float32), jnp.full((s,), t, jnp.float32),
                              jnp.full((s,), k, jnp.int32), jnp.full((s,), p, jnp.float32),
                              jnp.asarray(seeds, jnp.uint32), jnp.asarray(counters, jnp.uint32))
    return np.asarray(toks), np.asarray(lps)


def test_greedy_and_logprob():
    logits = np.random.default_rng().standard_normal((5, 50)).astype(np.float32)
    toks, lps = _draw(logits, 0.0, 0, 1.0, np.arange(5), np.zeros(5))
    assert np.array_equal(toks, logits.argmax(-1))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lps, ref[np.arange(5), toks], atol=1e-5)


def test_top_k_and_top_p_restrict_support():
    rng = np.random.default_rng()
    row = rng.standard_normal(40).astype(np.float32)
    logits = np.tile(row, (400, 1))
    toks, _ = _draw(logits, 1.0, 3, 1.0, np.arange(400), np.zeros(400))
    assert set(toks) <= set(np.argsort(-row)[:3]) and len(set(toks)) > 1
    probs = np.exp(row) / np.exp(row).sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)])
    toks, _ = _draw(logits, 1.0, 0, 0.5, np.arange(400), np.zeros(400))
    assert set(toks) <= nucleus


def test_seed_reproducible_and_counter_advances():
    logits = np.zeros((2, 1000), np.float32)
    a, _ = _draw(logits, 1.0, 0, 1.0, [7, 7], [0, 1])
    b, _ = _draw(logits, 1.0, 0, 1.0, [7, 7], [0, 1])
    assert np.array_equal(a, b) and a[0] != a[1]


# -- the sort-free cut search (issue 27) against a float64 oracle and the sorted sampler it replaced

def _oracle_support(scaled, k, p):
    """float64 numpy, one row: values >= the k-th largest (ties kept); of those, values >= the
    largest cut whose softmax mass (over the top-k set) of values >= it reaches p."""
    s = scaled.astype(np.float64)
    desc = np.sort(s)[::-1]
    kth = desc[(len(s) if k <= 0 else min(k, len(s))) - 1]
    top_k = s >= kth
    if p >= 1:
        return top_k
    kept = desc[desc >= kth]
    cum = np.cumsum(np.exp(kept - s.max())) / np.exp(kept - s.max()).sum()
    cut = kept[min(int(np.searchsorted(cum, p)), len(kept) - 1)]
    return top_k & (s >= cut)


def _rows(rng, s, v):
    """Logits with ties, very peaked and very flat rows, and per-row sampling parameters mixing
    greedy, top_k 1/5/V/0 and top_p 0.1/0.9/1.0."""
    x = rng.standard_normal((s, v)) * 3
    kinds = np.arange(s) % 6
    x[kinds == 1] = np.round(x[kinds == 1] * 2) / 2  # many ties, -0.0 among them
    x[kinds == 2, rng.integers(v)] += 60  # one token holds all the mass (the tail underflows)
    x[kinds == 3] *= 1e-4  # nearly uniform
    x[kinds == 4] = 0.25  # exactly uniform: one tie group
    x[kinds == 5] = np.round(x[kinds == 5])  # integers: tie groups far apart
    # every parameter value on a fixed share of the rows (shuffled), so each run covers every case
    def spread(values):
        return rng.permutation(np.resize(np.asarray(values), s))

    temperature = spread([0.0, 0.6, 1.0, 1.7]).astype(np.float32)
    top_k = spread([0, 1, 5, v, v + 7]).astype(np.int32)
    top_p = spread([0.1, 0.9, 1.0, rng.uniform(0.2, 0.99)]).astype(np.float32)
    return x.astype(np.float32), temperature, top_k, top_p


def test_ordered_keys_keep_the_float_order():
    from atom_jax.engine.sampler import ordered_keys

    # normal floats only: XLA flushes subnormals to zero, for its comparisons too
    x = np.concatenate([np.random.default_rng().standard_normal(200) * 10 ** np.arange(-20, 20, 0.2),
                        [0.0, -0.0, np.inf, -np.inf, 1.2e-38, -1.2e-38, 3.4e38, -3.4e38]]).astype(np.float32)
    keys = np.asarray(jax.jit(ordered_keys)(x)).astype(np.int64)
    i, j = np.triu_indices(len(x), 1)
    assert np.array_equal(np.sign(keys[i] - keys[j]), np.sign(x[i].astype(np.float64) - x[j]))


@pytest.mark.parametrize("s,v,variant", [
    (48, 700, "default"), pytest.param(64, 129280, "default", marks=pytest.mark.gpu, id="v4-vocab"),
    pytest.param(64, 129280, "4x1", marks=pytest.mark.gpu, id="v4-vocab-one-level-sums")])
def test_support_matches_float64_oracle_and_draws_match_sorted_sampler(s, v, variant):
    from atom_jax.bench.sampler import radix_variant
    from atom_jax.engine import sampler

    with radix_variant(variant):
        _support_and_draws(s, v, sampler.support_mask, sampler.sample_tokens)


def _support_and_draws(s, v, support_mask, sample_tokens):
    rng = np.random.default_rng()
    logits, temperature, top_k, top_p = _rows(rng, s, v)
    # the scaled logits as the backend divides them (the oracle and both samplers see the same)
    scaled = np.asarray(jax.jit(lambda x, t: x / jnp.maximum(t, 1e-6)[:, None])(logits, temperature))
    got = np.asarray(jax.jit(support_mask)(scaled, top_k, top_p))
    for r in range(s):
        near = [_oracle_support(scaled[r], top_k[r], q) for q in (top_p[r], top_p[r] - 1e-6, top_p[r] + 1e-6)]
        assert any(np.array_equal(got[r], m) for m in near), (r, top_k[r], top_p[r], got[r].sum(), near[0].sum())
    # the passes as a GPU runs them (unrolled; rolled on the CPU) keep the same sets
    with lowering_for("cuda"):
        np.testing.assert_array_equal(np.asarray(jax.jit(support_mask)(scaled, top_k, top_p)), got)
    # the kept sets span the cases: one token, a few, a nucleus, the whole row
    sizes = got.sum(-1)
    between = sizes[(sizes > 1) & (sizes < v)]
    assert sizes.min() == 1 and sizes.max() == v and len(between) >= 4 and len(set(between.tolist())) >= 3

    args = (jnp.asarray(logits), jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p),
            jnp.asarray(rng.integers(0, 2**32, s), jnp.uint32), jnp.asarray(rng.integers(0, 2**32, s), jnp.uint32))
    toks, lps = map(np.asarray, jax.jit(sample_tokens)(*args))
    ref_toks, ref_lps, ref_support = map(np.asarray, jax.jit(sorted_sampler)(*args))
    same = (got == ref_support).all(-1)
    # the sorted cumsum can reach 1.0 before the row's tail (its mass rounds away), so with
    # top_p 1.0 it drops that tail; below 1.0 the two agree but where the f32 cumsum (up to
    # 129K terms) lands on the other side of a cut
    boundary = np.array([not np.array_equal(_oracle_support(scaled[r], top_k[r], top_p[r] - 1e-5),
                                            _oracle_support(scaled[r], top_k[r], top_p[r] + 1e-5)) for r in range(s)])
    assert same[(top_p < 1) & ~boundary].all() and same.sum() >= s // 2, same
    np.testing.assert_array_equal(toks[same], ref_toks[same])
    # log-probs: the same float32 log-sum-exp over the row, its terms summed in another order by the
    # one-level variant (SUM_LEVELS 1): equal up to a few ulps (an H200 gave 1 ulp on 2 of 59 rows)
    np.testing.assert_array_max_ulp(lps[same], ref_lps[same], maxulp=4)
    assert got[np.arange(s), toks][temperature > 0].all()
    assert np.array_equal(toks[temperature == 0], logits[temperature == 0].argmax(-1))


@pytest.mark.parametrize("spec", ["4x1", "8x1"])
def test_radix_variants_keep_the_default_supports(spec):
    """The bench's radix variants (key bits per pass x row-sum levels) cut where the default does
    (rolled passes: the unrolled ones, as a GPU runs them, are checked above for the default)."""
    from atom_jax.bench.sampler import radix_variant
    from atom_jax.engine.sampler import support_mask

    rng = np.random.default_rng()
    logits, temperature, top_k, top_p = _rows(rng, 48, 700)
    scaled = logits / np.maximum(temperature, 1e-6)[:, None]
    want = np.asarray(jax.jit(support_mask)(scaled, top_k, top_p))
    with radix_variant(spec):
        got = np.asarray(jax.jit(support_mask)(scaled, top_k, top_p))
    np.testing.assert_array_equal(got, want)
