"""Benchmarks: `python -m atom_jax.bench sim ...` (scheduler simulator, no model)."""
