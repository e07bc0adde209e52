"""OpenAI-compatible HTTP server over the Engine (`python -m atom_jax.serve`).

Modules: cli (flags, uvicorn), app (routes), protocol (request models), prepare (request ->
engine inputs, 400s), engine_loop (the engine thread and its asyncio bridge), responses
(OpenAI bodies and stream chunks), streaming (SSE + disconnect), metrics (Prometheus),
middleware (API key, body size), errors (OpenAI error bodies), warmup (--warmup)."""
