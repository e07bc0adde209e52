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


def test_auto_runs_plain_calls_on_mosaic_only_in_its_window(monkeypatch):
    """`auto`'s one Mosaic decision (`plain_on_mosaic`): Hopper, rows per expert in the window (open
    below, closed above), bf16 rows and dense bf16 [G, K, N] weights the Mosaic tiles divide; the
    window set to None turns it off. The row-gathering and epilogue calls never ask (see `auto`)."""
    import jax

    from atom_jax.kernels.packed import DenseKMajor
    lo, hi = grouped_gemm.MOSAIC_PLAIN_ROWS_PER_GROUP
    S = jax.ShapeDtypeStruct
    rows, w = S((4096, 2048), jnp.bfloat16), S((16, 2048, 4096), jnp.bfloat16)
    on = lambda r=rows, wt=w, rpg=(lo + hi) / 2, hopper=True: grouped_gemm.plain_on_mosaic(r, wt, rpg, hopper)  # noqa: E731
    assert on() and on(rpg=hi)
    assert not on(rpg=lo) and not on(rpg=hi + 1) and not on(hopper=False)
    assert not on(r=S((4096, 2048), jnp.float32), wt=S((16, 2048, 4096), jnp.float32))  # float32 models
    assert not on(wt=S((16, 2048, 4000), jnp.bfloat16))  # N not a multiple of the CTA's 256 columns
    assert not on(wt=S((16, 2000, 4096), jnp.bfloat16))  # K not a multiple of 64
    assert not on(wt=DenseKMajor(S((16, 4096, 2048), jnp.bfloat16)))
    monkeypatch.setattr(grouped_gemm, "MOSAIC_PLAIN_ROWS_PER_GROUP", None)
    assert not on()


def test_auto_asks_about_mosaic_for_plain_calls_only(monkeypatch):
    """`auto`'s wiring, as on a Hopper GPU (the platform checks patched, the backends spied): a
    plain call in the window goes to 'mosaic'; the same call with row ids or an epilogue, or
    outside the window, to 'pallas' with its arguments as given; FP4 experts on the dequant path
    take the same route for their decoded weights."""
    from atom_jax.kernels import packed

    calls = []
    monkeypatch.setattr(grouped_gemm, "_on_cpu", lambda: False)
    monkeypatch.setattr(grouped_gemm, "_is_hopper", lambda: True)
    monkeypatch.setattr(grouped_gemm, "choose", lambda rows_per_group, *a, **kw: "pallas")  # GPU's choice at these sizes
    for name in ("mosaic", "pallas"):
        spy = lambda rows, w, sizes, mean=None, _n=name, **kw: calls.append((_n, rows.shape, kw)) or rows  # noqa: E731
        monkeypatch.setitem(grouped_gemm._BACKENDS, name, spy)
    monkeypatch.setattr(grouped_gemm, "pallas", grouped_gemm._BACKENDS["pallas"])  # the dequant path's direct call
    lo, hi = grouped_gemm.MOSAIC_PLAIN_ROWS_PER_GROUP
    g, k, n = 4, 128, 256
    mean = (lo + hi) / 2
    rows, w = jnp.zeros((int(g * mean), k), jnp.bfloat16), jnp.zeros((g, k, n), jnp.bfloat16)
    sizes = jnp.full((g,), int(mean), jnp.int32)
    run = grouped_gemm.get("auto")
    run(rows, w, sizes, mean_group=mean, zero_tail=False)
    run(rows, w, sizes, mean_group=mean, row_ids=jnp.zeros((rows.shape[0],), jnp.int32))
    run(rows, w, sizes, mean_group=mean, epilogue=(lambda a, b: b, jnp.zeros((rows.shape[0], n))))
    run(rows, w, sizes, mean_group=hi + 1)
    assert [c[0] for c in calls] == ["mosaic", "pallas", "pallas", "pallas"]
    assert "row_ids" in calls[1][2] and calls[2][2]["epilogue"] is not None
    # FP4 experts at the dequant path's rows per expert, N-major codes: decoded, then the same choice
    calls.clear()
    monkeypatch.setattr(grouped_gemm, "_decode", lambda how, weights, dtype: w)
    fp4 = packed.Fp4Weights(jnp.zeros((g, k // 2, n), jnp.uint8), jnp.zeros((g, k // 32, n), jnp.uint8))
    monkeypatch.setattr(grouped_gemm, "_dequant_path_fits", lambda weights, rpg: True)
    big = max(mean, grouped_gemm.DEQUANT_MIN_ROWS_PER_GROUP)
    run(rows, fp4, sizes, mean_group=big, zero_tail=False)
    grouped_gemm.get("pallas")(rows, fp4, sizes, mean_group=big, zero_tail=False)
    assert [c[0] for c in calls] == ["mosaic" if lo < big <= hi else "pallas", "pallas"]
