"""trace/op_bytes.py: the bytes and FLOPs census of a lowered program, on a small program whose
numbers follow from its shapes: a dot in a layer scope, a gather in a loop of 3 trips, a
switch on a computed index (only the picked branch counted), a grouped-GEMM-named kernel's
FLOPs from its shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from atom_jax.trace import op_bytes


def _module(fn, *args):
    return jax.jit(fn).lower(*args).compiler_ir("stablehlo")


def test_tensor_bytes_reads_shapes_and_dtypes():
    assert op_bytes.tensor_bytes("tensor<8192x64x512xbf16>") == 8192 * 64 * 512 * 2
    assert op_bytes.tensor_bytes("tensor<3x5xf32>") == 60
    assert op_bytes.tensor_bytes("tensor<i32>") == 4
    assert op_bytes.tensor_bytes("!stablehlo.token") == 0


@pytest.mark.parametrize("branch", [0, 1])
def test_census_weights_loops_and_the_picked_branch(branch):
    def f(x, w, idx, k):
        with jax.named_scope("layer1"):
            y = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [64, 32] from [64, 128] x [128, 32]

        def body(i, acc):
            return acc + jnp.take(x, idx + i, axis=0).astype(jnp.float32).sum()  # a [16, 128] bf16 gather

        s = jax.lax.fori_loop(0, 3, body, jnp.float32(0))
        z = jax.lax.switch(k, [lambda v: jnp.concatenate([v, v])[::2], lambda v: jnp.concatenate([v, v, v, v])[::4]], y)
        return s, z

    x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((128, 32), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((16,), jnp.int32)
    k = jax.ShapeDtypeStruct((), jnp.int32)
    rows, notes = op_bytes.census_ops(_module(f, x, w, idx, k), branch=lambda n: branch)
    assert any("2 branches" in n for n in notes)
    table = op_bytes.census_table(rows)
    moved, flops, runs = table["layer1"]["dot_general"]
    assert (flops, runs) == (2.0 * 64 * 128 * 32, 1)
    assert moved == (64 * 128 + 128 * 32) * 2 + 64 * 32 * 4
    gathers = [r for r in rows if r.family == "gather"]
    assert sum(r.times * r.bytes for r in gathers) == 3 * 2 * 16 * 128 * 2
    assert all("body" in r.where or "take" in r.where or "gather" in r.where for r in gathers)
    concat = sum(r.times * r.bytes for r in rows if r.family == "concatenate")
    assert concat == 2 * (2 if branch == 0 else 4) * 64 * 32 * 4  # the picked branch's copy only
    assert "dot_general" in op_bytes.format_census(table)
    assert op_bytes.top_ops(rows, 1)[0].bytes * op_bytes.top_ops(rows, 1)[0].times == max(r.bytes * r.times
                                                                                          for r in rows)


def test_grouped_gemm_flops_from_the_weights_shape():
    name = "grouped_gemm/pallas_call @ grouped_gemm_ranges pallas_grouped_gemm.py:204"
    operands = [[640], [49152, 2048], [256, 2048, 4096]]
    assert op_bytes.grouped_gemm_flops(name, operands, [[49152, 4096]]) == 2.0 * 49152 * 2048 * 4096
    assert op_bytes.grouped_gemm_flops("indexer_scores/pallas_call", operands, [[49152, 4096]]) == 0.0
    # FP4 codes hold K/2 bytes per column ([E, K/2, N]; K-major [E, N, K/2]): K is the rows'
    for codes in ([256, 1024, 4096], [256, 4096, 1024]):
        packed = [[640], [49152, 2048], codes, [256, 64, 4096]]
        assert op_bytes.grouped_gemm_flops(name, packed, [[49152, 4096]]) == 2.0 * 49152 * 2048 * 4096


def test_grouped_gemm_reads_its_expert_weights():
    types = ["tensor<640xi32>", "tensor<49152x2048xbf16>", "tensor<256x2048x4096xbf16>"]
    assert op_bytes.grouped_gemm_reads("grouped_gemm/pallas_call", types) == 256 * 2048 * 4096 * 2
    assert op_bytes.grouped_gemm_reads("sparse_attention_all/pallas_call", types) == 0
