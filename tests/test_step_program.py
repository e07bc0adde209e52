"""The engine's decode step program holds nothing that makes the host wait for the device while
it is launched (issue 27): no while loop whose trip count follows the data, no conditional, no
host callback outside kernel bodies (`atom_jax.trace.host_sync`). XLA's GPU runtime copies
such a loop's predicate or a conditional's branch index to the host and waits for it, so the
call of the step would return only when the device reached it.

The step is built from abstract shapes at V4-Flash dims (4 layers: sliding, sliding, CSA, HCA;
nothing allocated) and traced for CUDA on this CPU, so the Pallas kernel path is the one
checked; contexts past 16K tokens give the indexer more than one top-k rung, where the decode
step used to switch on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from atom_jax.bench.hlo_ops import _config, decode_program
from atom_jax.kernels.platform import lowering_for
from atom_jax.models import index_topk
from atom_jax.trace.host_sync import format_host_syncs, host_sync_ops


def _decode_step(bucket: int, context: int, lower: bool = False):
    """-> (host syncs of the traced step, its StableHLO text lowered for CUDA or None, the
    number of donated leaves: the cache's and the page table)."""
    cfg = _config("v4-flash", 4)
    fn, args, kw = decode_program(cfg, dp=1, bucket=bucket, slots=64, context=context, expert_layout="nmajor")
    with lowering_for("cuda"):
        traced = fn.trace(*args, **kw)
        text = traced.lower(lowering_platforms=("cuda",)).as_text() if lower else None
    return host_sync_ops(traced.jaxpr, "cuda"), text, len(jax.tree.leaves(args[1])) + 1


def _decode_syncs(bucket: int, context: int):
    return _decode_step(bucket, context)[0]


@pytest.mark.parametrize("bucket,context", [(1, 1 << 20), (64, 1 << 17)])
def test_decode_step_launch_never_waits_for_the_device(bucket, context):
    ops, text, donated = _decode_step(bucket, context, lower=bucket == 64)
    assert not ops, format_host_syncs(ops)
    if text is not None:
        # every donated buffer (the cache, the page table) is updated in place: a donated input
        # XLA cannot alias is copied whole by the step instead
        main = text[text.index("func.func public @main"):]
        assert main[: main.index("{\n")].count("tf.aliasing_output") == donated == 19
        # the sampler finds its top-k / top-p cuts without sorting the vocabulary (a segmented
        # radix sort of [S, vocab] f32 was ~1 ms of a 128-row decode step)
        assert "stablehlo.sort" not in text


def test_the_check_sees_the_rung_switch(monkeypatch):
    """Without the switch-free decode plan, the indexer's rung switch is in the CSA layer: the
    check above would fail if it came back."""
    monkeypatch.setattr(index_topk, "AUTO_SWITCH_FREE", None)
    ops = _decode_syncs(1, 1 << 20)
    assert [(o.kind, o.detail, o.scope) for o in ops] == [("cond", "4 branches", "layer2")], ops
    assert "models/index_topk.py" in ops[0].where


def test_host_sync_ops_kinds():
    """Each kind on a small function: listed where the launch would wait, not for the loops of
    known trip count, platform choices or a kernel's own loop and branch."""
    def kernel(x_ref, n_ref, o_ref):
        acc = jax.lax.fori_loop(0, n_ref[0], lambda i, a: a + x_ref[...], jnp.zeros_like(x_ref[...]))
        o_ref[...] = jax.lax.cond(n_ref[0] > 2, lambda: acc, lambda: -acc)

    def fn(x, n):
        static = jax.lax.fori_loop(0, 4, lambda i, a: a * 2, x)  # a scan: known trip count
        dynamic = jax.lax.fori_loop(0, n[0], lambda i, a: a + 1, x)
        branch = jax.lax.cond(n[0] > 0, jnp.sin, jnp.cos, x)
        plat = jax.lax.platform_dependent(x, cpu=jnp.exp, default=jnp.tanh)
        cb = jax.pure_callback(lambda a: np.asarray(a) + 1, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        kern = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x, n)
        return static + dynamic + branch + plat + cb + kern

    x, n = jnp.ones((8,), jnp.float32), jnp.array([3], jnp.int32)
    jaxpr = jax.make_jaxpr(fn)(x, n)
    kinds = sorted((o.kind, o.detail) for o in host_sync_ops(jaxpr, "cpu"))
    assert kinds == [("cond", "2 branches"), ("pure_callback", ""), ("while", "")], kinds
    assert all("tests/test_step_program.py" not in o.where for o in host_sync_ops(jaxpr))  # atom_jax frames only
    # the numbers the function computes are unchanged by being inspected
    np.testing.assert_allclose(jax.jit(fn)(x, n), fn(x, n), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("bucket,context", [(1, 1 << 20), (64, 1 << 17)])
def test_compiled_decode_step_has_no_host_sync(bucket, context):
    """The same decode steps compiled by XLA for this GPU (abstract arguments: nothing
    allocated): no conditional and every while loop with a known trip count in the compiled
    module, so nothing XLA adds (sort or scatter expansions, loops of its own) waits either."""
    from atom_jax.trace.op_counts import compiled_launches

    from atom_jax.weights.formats import resolve_layout

    cfg = _config("v4-flash", 4)
    fn, args, kw = decode_program(cfg, dp=1, bucket=bucket, slots=64, context=context,
                                  expert_layout=resolve_layout("auto", "gpu", "bf16"))  # the engine's on a GPU
    _, notes = compiled_launches(fn.trace(*args, **kw).lower().compile().as_text())
    assert not notes, notes  # "while ...: trip count unknown" / "conditional ...: every branch counted"
