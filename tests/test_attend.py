"""`models.attention.attend` (the full-sequence attention core) against a float64 softmax over
the keys with the per-head sink appended, fresh random inputs: rows with no visible key (all
weight on the sink), sinks far above and below the logits."""

import jax.numpy as jnp
import numpy as np

from atom_jax.models.attention import attend


def _reference(q, keys, visible, sinks, scale):
    logits = np.einsum("bshd,bkd->bhsk", q, keys) * scale
    logits = np.where(visible[:, None], logits, -np.inf)
    sink = np.broadcast_to(sinks[None, :, None, None], (*logits.shape[:3], 1))
    full = np.concatenate([logits, sink], axis=-1)
    p = np.exp(full - full.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhsk,bkd->bshd", p[..., :-1], keys)


def test_attend_matches_float64_softmax_with_sink():
    rng = np.random.default_rng()
    b, s, h, d, k = 2, 9, 4, 16, 13
    q = rng.standard_normal((b, s, h, d))
    keys = rng.standard_normal((b, k, d))
    visible = rng.random((b, s, k)) < 0.6
    visible[0, 0] = False  # no visible key: the output is zero (all mass on the sink)
    sinks = np.array([-30.0, 0.0, rng.standard_normal(), 30.0])  # negligible ... dominant
    out = np.asarray(attend(*(jnp.asarray(a, jnp.float32) for a in (q, keys)), jnp.asarray(visible),
                            jnp.asarray(sinks, jnp.float32), d ** -0.5))
    ref = _reference(q, keys, visible, sinks, d ** -0.5)
    assert np.all(out[0, 0] == 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
