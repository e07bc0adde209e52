"""On-device sampling: greedy, top-k / top-p supports, seeded reproducibility."""

import jax.numpy as jnp
import numpy as np

from atom_jax.engine.sampler import sample_tokens


def _draw(logits, t, k, p, seeds, counters):
    s = logits.shape[0]
    toks, lps = sample_tokens(jnp.asarray(logits, jnp.float32), jnp.full((s,), t, jnp.float32),
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
