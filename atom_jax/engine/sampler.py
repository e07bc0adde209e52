"""The on-device sampler the compiled step runs: greedy, temperature, top-k, top-p,
per-request seeds; logprob of the chosen token (from the model's unscaled distribution).
The per-request parameters it reads are `atom_jax.scheduler.sampling_params.SamplingParams`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits, temperature, top_k, top_p, seeds, counters):
    """logits [S, V] f32; temperature/top_p [S] f32; top_k [S] i32 (0 = off); seeds/counters
    [S] u32 (key = fold_in(key(seed), counter): a request's draws don't depend on its batch).
    -> (tokens [S] i32, logprobs [S] f32)."""
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    keep_n = jnp.sum(cum - jax.nn.softmax(desc, axis=-1) < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(desc, jnp.maximum(keep_n - 1, 0)[:, None], axis=-1)
    masked = jnp.where((scaled >= kth) & (scaled >= pth), scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = jnp.where(temperature <= 0, greedy, drawn).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
