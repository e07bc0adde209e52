"""Grouped-GEMM backend names, importable without jax (CLIs parse flags before jax starts)."""

MOE_BACKENDS = ("auto", "pallas", "mosaic", "tokamax", "capacity_dropless", "ragged_dot", "dense", "capacity")
