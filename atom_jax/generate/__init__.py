"""Offline batch generation: `python -m atom_jax.generate --input IN.jsonl --output OUT.jsonl`
(see `atom_jax.generate.cli` for the file formats)."""

from atom_jax.generate.cli import main

__all__ = ["main"]
