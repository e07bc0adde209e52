"""Random expert routings for grouped-GEMM benchmarks and tests, as group sizes."""

from __future__ import annotations

import numpy as np


def uniform_sizes(rng, rows: int, groups: int) -> np.ndarray:
    """Each row picks an expert uniformly at random."""
    return np.bincount(rng.integers(0, groups, rows), minlength=groups).astype(np.int32)


def skewed_sizes(rng, rows: int, groups: int) -> np.ndarray:
    """A quarter of the experts empty and one expert holding most rows; sums to `rows`."""
    w = rng.exponential(size=groups)
    w[rng.choice(groups, groups // 4, replace=False)] = 0.0
    w[rng.integers(groups)] += w.sum() * 2
    s = np.floor(w / w.sum() * rows).astype(np.int32)
    s[np.argmax(s)] += rows - s.sum()
    return s
