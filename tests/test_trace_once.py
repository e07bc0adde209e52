"""Each layer kind traced once (models/trace_once.py): the engine's cached step with its layers'
pieces as nested jits reused across layers gives bit-identical logits and caches to the step
traced layer by layer, keeps every op in its `layer<i>` scope, and traces each kind's attention
once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atom_jax.cache import CacheLayout, init_cache, pack_chunks
from atom_jax.config import tiny
from atom_jax.loader import random_model
from atom_jax.models import trace_once
from atom_jax.sharding import DP, StepOptions, make_dp_mesh
from atom_jax.sharding.cached_step import make_cached_step
from atom_jax.trace import op_counts

DP_SIZE = 2
LAYOUT = CacheLayout(num_slots=2, num_pages=9, page_tokens=16, max_pages_per_seq=4, state_pages=4)


def _steps(cfg, model):
    mesh = make_dp_mesh(DP_SIZE)
    once, _ = make_cached_step(model, mesh, LAYOUT, StepOptions(trace_layers_once=True))
    unrolled, specs = make_cached_step(model, mesh, LAYOUT, StepOptions(trace_layers_once=False))
    pure = nnx.split(model)[1].to_pure_dict()
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), pure, specs)
    one = init_cache(cfg, LAYOUT, jnp.float32)
    rng = np.random.default_rng()
    # a cache with history: random rows everywhere (ring, tails, compressed entries)
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal((DP_SIZE,) + a.shape), a.dtype)
                         if jnp.issubdtype(a.dtype, jnp.floating) else jnp.broadcast_to(a, (DP_SIZE,) + a.shape), one)
    cache = jax.device_put(cache, NamedSharding(mesh, P(DP)))
    table = jnp.asarray(np.arange(1, 9, dtype=np.int32).reshape(1, 2, 4).repeat(DP_SIZE, 0))
    return once, unrolled, params, cache, jax.device_put(table, NamedSharding(mesh, P(DP)))


def _batch(rng, vocab, chunks_per_rank, tbo):
    mesh = make_dp_mesh(DP_SIZE)
    packed = [pack_chunks([(slot, start, rng.integers(0, vocab, n).astype(np.int32), True)
                           for slot, start, n in chunks], 32, LAYOUT.num_slots, split=tbo).arrays()
              for chunks in chunks_per_rank]
    return {k: jax.device_put(np.stack([p[k] for p in packed]), NamedSharding(mesh, P(DP))) for k in packed[0]}


def test_traced_once_step_is_bit_identical_to_the_unrolled_one():
    """Two steps (prefill chunks, then decode and a chunk continuing a sequence), TBO on (both
    chains of each layer share one trace), every layer kind of the tiny model (sliding + hash
    routing, CSA twice, HCA): logits and every cache array equal bit for bit."""
    cfg = tiny()
    model = random_model(cfg, seed=int(np.random.default_rng().integers(1 << 30)))
    once, unrolled, params, cache, table = _steps(cfg, model)
    rng = np.random.default_rng()
    c_once, c_unrolled = cache, jax.tree.map(jnp.copy, cache)  # each step donates its cache
    for chunks in ([[(0, 0, 21), (1, 0, 9)], [(1, 0, 30)]],  # prefill: windows complete (ratios 4, 16)
                   [[(0, 21, 1), (1, 9, 12)], [(1, 30, 1), (0, 0, 5)]]):  # decode + continuations
        b = _batch(rng, cfg.vocab_size, chunks, tbo=True)
        l_once, c_once = once(params, c_once, b, table, tbo=True)
        l_unrolled, c_unrolled = unrolled(params, c_unrolled, b, table, tbo=True)
        np.testing.assert_array_equal(np.asarray(l_once), np.asarray(l_unrolled))
        assert np.isfinite(np.asarray(l_once)).all()
        for a, b_ in zip(jax.tree.leaves(c_once), jax.tree.leaves(c_unrolled)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_each_kind_is_traced_once_and_ops_keep_their_layer():
    """The jaxpr of the traced-once step: one attention trace per attention kind (the two CSA
    layers and both TBO chains share one), the same primitives per `layer<i>` scope as the
    unrolled step (nested jits aside), and a `traced_once` function outside a session runs as
    written."""
    cfg = tiny()
    model = random_model(cfg)
    once, unrolled, params, cache, table = _steps(cfg, model)
    b = _batch(np.random.default_rng(0), cfg.vocab_size, [[(0, 0, 20)], [(1, 0, 7)]], tbo=True)
    j_once = once.trace(params, cache, b, table, tbo=True).jaxpr  # traced only: nothing donated
    j_unrolled = unrolled.trace(params, cache, b, table, tbo=True).jaxpr

    attn_jaxprs = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("pjit", "jit") and eqn.params["name"] == "_cached_attention":
                attn_jaxprs.add(id(eqn.params["jaxpr"].jaxpr))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(j_once.jaxpr)
    assert len(attn_jaxprs) == len(set(cfg.attn_kinds)) == 3

    def per_layer(jaxpr):
        counts = op_counts.jaxpr_counts(jaxpr)
        return {scope: {k: v for k, v in c.items() if k not in ("pjit", "jit")} for scope, c in counts.items()}

    layers = [f"layer{i}" for i in range(cfg.num_layers)]
    got, want = per_layer(j_once), per_layer(j_unrolled)
    assert op_counts.layer_order(got) == layers + [op_counts.STEP]
    assert got == want

    assert not trace_once.active()
    hc = model.layers[0].hc_attn
    x = jnp.ones((3, cfg.hc_mult, cfg.hidden_size))
    # a fresh function each time: make_jaxpr caches traces by function
    nested = lambda: [e for e in jax.make_jaxpr(lambda v: hc(v))(x).jaxpr.eqns  # noqa: E731
                      if e.primitive.name in ("pjit", "jit")]
    assert not nested()  # no session: as written
    with trace_once.session():
        assert trace_once.active()
        assert [e.params["name"] for e in nested()] == ["__call__"]
    assert not trace_once.active()


def test_traced_once_full_sequence_step_is_bit_identical():
    """The full-sequence DP step (sharding/step.py: full-sequence attention per segment, TBO
    cutting a row so chain B reads chain A's attention input as its prefix): the same logits
    bit for bit with each layer kind traced once as traced layer by layer."""
    from atom_jax.sharding import make_step, shard_tokens

    cfg = tiny()
    model = random_model(cfg, seed=int(np.random.default_rng().integers(1 << 30)))
    mesh = make_dp_mesh(DP_SIZE)
    ids = shard_tokens(np.random.default_rng().integers(0, cfg.vocab_size, (DP_SIZE * 1, 40)), mesh)
    out = {}
    for once in (True, False):
        step, params = make_step(model, mesh, StepOptions(trace_layers_once=once))
        out[once] = np.asarray(step(params, ids, tbo=True))
    np.testing.assert_array_equal(out[True], out[False])
    assert np.isfinite(out[True]).all()
