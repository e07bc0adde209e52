"""Trace each layer kind once: the pieces of a decoder layer as nested jits, reused by every
layer of the same structure.

A Python-unrolled 43-layer step traces every layer anew (minutes of a cold start per bucket
program: Pallas kernel bodies, mHC Sinkhorns, MoE routing, attention, 43 times over), though
layers of one kind (sliding / CSA / HCA attention, hashed or learned routing) have identical
shapes. A function decorated with `traced_once(fn)` -- its first argument an nnx module (a
layer's attention, MoE, hyper-connection), the others arrays or static values -- runs, inside
a `session()`, as a `jax.jit` of (the module's state, the array arguments) per (module
structure, static arguments): JAX traces that jit once per argument shapes and lowers it once
as a private function every call site calls. XLA inlines the calls before optimising, so the
compiled program is the unrolled one (same fusions, same numerics); the call sites keep their
named scopes (`layer<i>`, `mb_a` / `mb_b`), which XLA prefixes onto the inlined ops' op_name.

Outside a session the function runs as written (eager calls, tests, other programs): a session
is entered by the step builders around the traced step body (sharding/cached_step.py,
sharding/step.py), so a jit never outlives the trace it was made for and a trace never sees
another's choices (the lowering platform, kernel switches read from the environment are read
when traced and hold for the whole session).

Arguments holding no array (strings, ints, a CacheLayout, None) are static: part of the key,
compared with ==. The decorated function must be a pure function of its arguments (module
state written inside would be lost)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import jax
import numpy as np
from flax import nnx

_SESSION: contextvars.ContextVar = contextvars.ContextVar("atom_jax_trace_once", default=None)


@contextlib.contextmanager
def session(enabled: bool = True):
    """Within the block, `traced_once` functions run as nested jits reused across layers
    (`enabled=False`: as written, the whole layer loop unrolled; for comparisons)."""
    token = _SESSION.set([] if enabled else None)
    try:
        yield
    finally:
        _SESSION.reset(token)


def active() -> bool:
    return _SESSION.get() is not None


def _has_array(value) -> bool:
    return any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(value))


def traced_once(fn):
    """Decorator: `fn(module, *args, **kwargs)` traced once per (module structure, static
    arguments, argument shapes) inside a `session()`; see the module docstring."""
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TypeError(f"traced_once: {fn.__qualname__} takes *args / **kwargs; name its arguments")

    @functools.wraps(fn)
    def wrapper(module, *args, **kwargs):
        jits = _SESSION.get()
        if jits is None:
            return fn(module, *args, **kwargs)
        bound = sig.bind(module, *args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        given.pop(names[0])
        static = {k: v for k, v in given.items() if not _has_array(v)}
        dynamic = {k: v for k, v in given.items() if k not in static}
        graphdef, state = nnx.split(module)
        for key_fn, key_graphdef, key_static, jitted in jits:
            if key_fn is fn and key_graphdef == graphdef and key_static == static:
                break
        else:
            jitted = _make_jit(fn, graphdef, static)
            jits.append((fn, graphdef, static, jitted))
        return jitted(state, dynamic)

    return wrapper


def _make_jit(fn, graphdef, static):
    def run(state, dynamic):
        return fn(nnx.merge(graphdef, state), **static, **dynamic)

    run.__name__ = run.__qualname__ = fn.__name__  # the op_name path reads ".../jit(<fn>)/..."
    return jax.jit(run)
