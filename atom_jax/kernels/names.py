"""Kernel backend names (grouped GEMM, cached attention), importable without jax (CLIs parse flags before jax starts)."""

MOE_BACKENDS = ("auto", "pallas", "mosaic", "tokamax", "capacity_dropless", "ragged_dot", "dense", "capacity")

# Cached-attention backends (models/cached_attention.py): auto = jnp on CPU, pallas on GPUs.
ATTN_BACKENDS = ("auto", "jnp", "pallas")
