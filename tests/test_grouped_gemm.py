"""Grouped-GEMM backends against a float64 per-group reference, with empty and large groups."""

import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import grouped_reference

from atom_jax.kernels import grouped_gemm


@pytest.mark.parametrize("backend", ["ragged_dot", "dense", "capacity"])
def test_backend_matches_reference(backend):
    rng = np.random.default_rng()
    g, k, n = 6, 16, 12
    sizes = np.array([0, 9, 1, 0, 14, 3])  # empty and large groups
    m = sizes.sum() + 5  # 5 trailing rows belong to no group: must come out zero
    rows = rng.standard_normal((m, k)).astype(np.float32)
    weights = rng.standard_normal((g, k, n)).astype(np.float32)
    kw = {"mean_group": 7.0} if backend == "capacity" else {}  # capacity 16 >= largest group
    out = np.asarray(grouped_gemm.get(backend)(jnp.asarray(rows), jnp.asarray(weights), jnp.asarray(sizes), **kw))
    ref = grouped_reference(rows, weights, sizes)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
    assert np.all(out[sizes.sum():] == 0)


def test_capacity_backend_drops_overflow_rows():
    rows = jnp.ones((20, 4))
    weights = jnp.ones((2, 4, 3))
    sizes = jnp.array([18, 2])
    out = np.asarray(grouped_gemm.capacity_padded(rows, weights, sizes, mean_group=1.0))  # capacity 8
    assert np.all(out[:8] == 4) and np.all(out[8:18] == 0) and np.all(out[18:20] == 4)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="nope"):
        grouped_gemm.get("nope")
