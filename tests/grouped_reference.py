"""Float64 per-group reference for grouped-GEMM tests."""

import numpy as np


def grouped_reference(rows, weights, sizes):
    """out[r] = rows[r] @ weights[g] for the rows of group g (consecutive, by size); other rows 0."""
    out = np.zeros((rows.shape[0], weights.shape[2]))
    start = 0
    for g, n in enumerate(sizes):
        out[start:start + n] = rows[start:start + n].astype(np.float64) @ weights[g].astype(np.float64)
        start += n
    return out
