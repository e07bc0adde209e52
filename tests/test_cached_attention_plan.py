"""The compressors' per-step window plan memo (models/cached_attention.PLANS): shared by every
layer of a step, and never handed out for a page table other than the one it was made from."""

import jax.numpy as jnp
import numpy as np

from atom_jax.models.cached_attention import PLANS, _window_plan


def _batch(n: int) -> dict:
    z = jnp.zeros(n, jnp.int32)
    return {"pos": jnp.arange(n, dtype=jnp.int32), "valid": jnp.ones(n, bool), "slot": z, "seg_start_idx": z,
            "seg_start_pos": z, "seg_end_pos": jnp.full(n, n, jnp.int32), PLANS: {}}


def test_window_plan_memo_hits_only_its_own_page_table():
    b = _batch(8)
    table = jnp.arange(4, dtype=jnp.int32)[None]  # one slot, pages 0..3
    args = (4, False, 4)  # ratio 4, no overlap, a 4-row tail
    first = _window_plan(b, *args, table, 1, 16, 1)
    assert _window_plan(b, *args, table, 1, 16, 1) is first  # the next layer reuses it
    # an entry stored under this table's id but made from another array (ids are reused once an
    # array is freed) must not be returned
    (key,) = b[PLANS]
    b[PLANS][key] = (object(), {"addr": "stale"})
    again = _window_plan(b, *args, table, 1, 16, 1)
    np.testing.assert_array_equal(again["addr"], first["addr"])
    other = jnp.arange(4, 8, dtype=jnp.int32)[None]  # another table: its own plan, other addresses
    assert not np.array_equal(_window_plan(b, *args, other, 1, 16, 1)["addr"], first["addr"])
