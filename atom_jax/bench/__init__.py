"""Benchmarks: `python -m atom_jax.bench COMMAND` (see __main__.COMMANDS): `sim` (scheduler
simulator, no model), `serve` (HTTP client), `gemm` / `gemm-compare` (grouped-GEMM kernels),
`dp-step` (sharded DP step, TBO on vs off), `engine-step` (cached step vs rooflines),
`engine` (the real Engine in process, SGLang-style report), `engine-delayer` (its PrefillDelayer preset)."""
