"""Compile every step shape before serving (`Engine.warmup`; `serve` does it by default,
`generate` before a `--profile` trace).

XLA compiles one program per token bucket (and per TBO choice, which follows from the bucket)
on first use (the sampler is part of each bucket's program, on min(bucket, num_slots) rows per
rank); on CPU each costs seconds, at full depth on a GPU minutes. Each is built ahead of its
first run (`ModelRunner.precompile`), which checks its temporary memory against the free device
memory.
Run on the engine thread before serving, so the first real requests do not pay for it."""

from __future__ import annotations

import logging
import time

from atom_jax.scheduler import SamplingParams
from atom_jax.sharding.memory import fmt_bytes

log = logging.getLogger("atom_jax.engine")


def _prompt_lengths(bucket: int, budget: int, chunk: int, slots: int) -> list[int]:
    """Prompt lengths that make one rank feed exactly min(bucket, budget) tokens in one step
    (one chunk per sequence, at most one sequence per slot)."""
    target, out = min(bucket, budget), []
    while target > 0 and len(out) < slots:
        n = min(chunk, target)
        out.append(n)
        target -= n
    return out


def warm_up(engine) -> None:
    cfg = engine.config
    max_prompt = max(1, engine.max_context - 1)
    # the warm-up prompts repeat one token: a prefix cache would shorten them below the bucket
    engine.reset_scheduler(cfg.delayer, prefix_caching=False)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    log.info("warm-up: compiling the step for each token bucket %s (a persistent compilation "
             "cache makes the next start fast)", list(engine.buckets))
    for bucket in engine.buckets:
        t0 = time.perf_counter()
        # compiled ahead (a no-op for a program `precompile` built already), so a program that
        # needs more temporary memory than the devices have free fails here with a clear error
        # (ProgramMemoryError) instead of in the allocator during its first run
        key = (bucket, engine.scheduler.use_tbo(bucket))
        engine.runner.precompile([key], workers=1)
        lengths = [min(n, max_prompt) for n in
                   _prompt_lengths(bucket, cfg.max_tokens_per_step, cfg.chunk_size, cfg.num_slots)]
        # The same set per rank: new requests go to the rank with the least pending prefill.
        prompts = [[1] * n for n in lengths] * cfg.dp
        engine.generate(prompts, one)
        temp = engine.runner.temp_bytes.get(key)
        log.info("warm-up: bucket %d%s ready in %.1f s%s", bucket, " (TBO)" if key[1] else "",
                 time.perf_counter() - t0, "" if temp is None else f", {fmt_bytes(temp)} of temporaries per GPU")
    if engine.layout.page_state and max_prompt > cfg.page_tokens:
        # the prefix cache's slot restore compiles on a real hit, through the step path (so every
        # process of a multi-host run takes part): the same prompt twice, one page reused
        engine.reset_scheduler(cfg.delayer, prefix_caching=True)
        for _ in range(2):
            engine.generate([[1] * (cfg.page_tokens + 1)], one)
    engine.reset_scheduler(cfg.delayer)  # the configured prefix cache, empty
