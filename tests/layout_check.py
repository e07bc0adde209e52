"""Shared check of the `--expert-layout` tests: a K-major model holds the nmajor model's routed
expert stacks transposed (FP4 codes or dense weights) and every other leaf as is."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from atom_jax.models.packed_params import FP4_EXPERTS


def assert_experts_transposed(kmajor, nmajor):
    """Every leaf of `kmajor` equals `nmajor`'s, the routed experts' w1/w3/w2 with their last two
    axes swapped; both have the same leaves."""
    want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(nmajor).to_pure_dict())}
    swapped = 0
    for path, got in jax.tree_util.tree_leaves_with_path(nnx.state(kmajor).to_pure_dict()):
        name, leaf = jax.tree_util.keystr(path), str(getattr(path[-1], "key", path[-1]))
        a = np.asarray(want.pop(name))
        if leaf in FP4_EXPERTS:
            a, swapped = np.swapaxes(a, -1, -2), swapped + 1
        np.testing.assert_array_equal(np.asarray(got), a, err_msg=name)
    assert not want and swapped == 3 * kmajor.cfg.num_layers
