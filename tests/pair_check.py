"""The gate/up pair check the CPU (interpret) and GPU grouped-GEMM tests share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from grouped_reference import grouped_reference

from atom_jax.bench.routings import skewed_sizes
from atom_jax.kernels import pallas_grouped_gemm as pg
from atom_jax.models.layers import swiglu_clamped

SWIGLU = functools.partial(swiglu_clamped, limit=2.5)


def check_pair_against_two_calls(rng, tiles, two_tiles, g, k, n, r, m, trailing, interpret, zero_tail=False,
                                 k_major=False):
    """`grouped_gemm_pair` (gate and up GEMMs in one kernel, SwiGLU stored) on rows gathered by
    row ids from a fresh skewed routing (empty groups, one large, `trailing` rows in no group)
    against the two calls it replaces (the gate GEMM, then the up GEMM with the SwiGLU epilogue,
    at `two_tiles`) and a float64 reference; rows past the groups zero with `zero_tail`.
    `k_major`: the stacks stored [G, N, K] (`transpose_b`, as decoded from K-major FP4 codes)."""
    sizes = jnp.asarray(skewed_sizes(rng, m - trailing, g))
    x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
    wa, wb = (jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.bfloat16) for _ in range(2))
    ids = jnp.asarray(rng.integers(0, r, m), jnp.int32)
    stacks = [jnp.swapaxes(w, 1, 2) if k_major else w for w in (wa, wb)]
    pair = np.asarray(jax.jit(lambda x, a, b, s, i: pg.grouped_gemm_pair(
        x, a, b, s, SWIGLU, cfg=tiles, interpret=interpret, row_ids=i, zero_tail=zero_tail,
        transpose_b=k_major))(x, *stacks, sizes, ids), np.float32)

    def two(x, wa, wb, s, i):
        gate = pg.grouped_gemm(x, wa, s, cfg=two_tiles, interpret=interpret, row_ids=i)
        return pg.grouped_gemm(x, wb, s, cfg=two_tiles, interpret=interpret, row_ids=i, epilogue=(SWIGLU, gate))

    want = np.asarray(jax.jit(two)(x, wa, wb, sizes, ids), np.float32)
    valid = m - trailing
    np.testing.assert_allclose(pair[:valid], want[:valid], rtol=2e-2, atol=2e-2 * np.abs(want).max())
    xf, af, bf = (np.asarray(v, np.float64) for v in (x[ids], wa, wb))
    s = np.asarray(sizes)
    ref = np.asarray(SWIGLU(jnp.asarray(grouped_reference(xf, af, s)), jnp.asarray(grouped_reference(xf, bf, s))))
    assert np.linalg.norm(pair[:valid] - ref[:valid]) / np.linalg.norm(ref[:valid]) < 1e-2
    if zero_tail:
        assert np.all(pair[valid:] == 0)
