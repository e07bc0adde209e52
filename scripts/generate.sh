#!/usr/bin/env bash
# Offline batch generation over a JSONL file; see `python -m atom_jax.generate --help`.
exec python -m atom_jax.generate "$@"
