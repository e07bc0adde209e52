"""The one-axis data-parallel mesh over every device of every process."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

DP = "dp"


def make_dp_mesh(num_devices: int | None = None) -> Mesh:
    """A `dp` mesh over the first `num_devices` global devices (all by default).

    Axis type Auto: since jax 0.9 `jax.make_mesh` defaults to Explicit axes, which would make
    every array carry its sharding in its type; our step uses shard_map with explicit specs."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for a dp mesh of {n} devices, only {len(devices)} exist")
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is not None:
        return jax.make_mesh((n,), (DP,), axis_types=(auto.Auto,), devices=devices[:n])
    return Mesh(np.array(devices[:n]), (DP,))
