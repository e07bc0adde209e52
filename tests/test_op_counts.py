"""Op counts per layer of the engine's decode step (`python -m atom_jax.bench hlo-ops`)."""

import jax
import jax.numpy as jnp
import pytest

from atom_jax.bench.hlo_ops import _config, count_program, decode_program
from atom_jax.trace import op_counts
from atom_jax.trace.capture import layer_scope


@pytest.fixture(scope="module")
def tiny_counts():
    cfg = _config("tiny", None)
    fn, args, kw = decode_program(cfg, dtype=jnp.float32, dp=2, bucket=8)
    return cfg, count_program(fn, args, kw, "cuda")


def test_decode_step_counts_per_layer(tiny_counts):
    cfg, res = tiny_counts
    layers = [f"layer{i}" for i in range(cfg.num_layers)]
    for view in ("jaxpr", "stablehlo"):
        assert op_counts.layer_order(res[view]) == layers + [op_counts.STEP]
    hlo = res["stablehlo"]
    for i, kind in enumerate(cfg.attn_kinds):
        c = hlo[f"layer{i}"]
        # one all-gather and one reduce-scatter per MoE layer, inside the layer's scope
        assert c["all_gather"] == 1 and c["reduce_scatter"] == 1
        # lowered for CUDA: the Triton kernels (3 expert GEMMs, 2 mHC Sinkhorns, sparse
        # attention, CSA's indexer), and no other reduction than a handful per layer
        assert c["custom_call:triton"] == 3 + 2 + 1 + (kind == "csa")
        assert c["reduce"] < 40
        assert res["jaxpr"][f"layer{i}"]["pallas_call"] == c["custom_call:triton"]
    # the sampler and the logits are outside every layer
    assert res["jaxpr"][op_counts.STEP]["argmax"] >= 1
    text = op_counts.format_table(hlo, "kind")
    assert text.splitlines()[0].split()[-2:] == ["step", "all"]


def test_platform_choice_counts_one_branch():
    def f(x):
        with layer_scope(3):
            return jax.lax.platform_dependent(x, cuda=lambda v: jnp.sort(v), default=lambda v: v * 2)

    x = jax.ShapeDtypeStruct((8,), jnp.float32)
    traced = jax.jit(f).trace(x)
    assert op_counts.jaxpr_counts(traced.jaxpr, "cuda")["layer3"]["sort"] == 1
    assert op_counts.jaxpr_counts(traced.jaxpr, "rocm")["layer3"]["sort"] == 0
    hlo = op_counts.stablehlo_counts(traced.lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo"))
    assert hlo["layer3"]["sort"] == 1 and hlo["layer3"]["case"] == 0


HLO = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p), metadata={op_name="jit(f)/layer1/exp"}
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/layer1/exp"}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %f)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %s = f32[4]{0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/layer0/pallas"}
  %t0 = (s32[], f32[4]{0}) tuple(s32[] constant(0), %s)
  %w = (s32[], f32[4]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %o = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_compiled_launches_multiply_loop_bodies():
    launches, notes = op_counts.compiled_launches(HLO)
    table = op_counts.compiled_counts_of(launches)
    assert table["layer0"] == {"custom-call:triton": 1}
    assert table["layer1"] == {"fusion:kLoop": 7}  # the body's fusion, 7 trips
    assert not notes
    unknown = HLO.replace(', backend_config={"known_trip_count":{"n":"7"}}', "")
    launches, notes = op_counts.compiled_launches(unknown)
    assert op_counts.compiled_counts_of(launches)["layer1"]["fusion:kLoop"] == 1 and len(notes) == 1


@pytest.mark.parametrize("weights", ["bf16", "native", "fp4-experts"])
def test_cli_takes_every_model_weight_format(weights):
    """`hlo-ops --weights` names every format a model is built in (weights.formats)."""
    import argparse

    from atom_jax.bench import hlo_ops

    parser = argparse.ArgumentParser()
    hlo_ops.add_parser(parser.add_subparsers())
    assert parser.parse_args(["hlo-ops", "--weights", weights]).weights == weights


def test_compiled_step_embeds_no_large_literal():
    """The engine's step at a 1024-token bucket with the Pallas attention kernels (interpreted
    on this CPU), where the indexer's running top-k has a static trip count of 1 (as 8K-token
    steps have on a GPU): XLA unrolled that loop and folded its [T, k + block] index array into
    a literal (here s32[1024,1028]; s32[8192,2688], 88 MB, per CSA layer of V4-Flash). No
    literal of 1 MiB or more is left in the compiled module."""
    from atom_jax.bench.hlo_ops import LARGE_CONSTANT_BYTES

    cfg = _config("tiny", None)
    fn, args, kw = decode_program(cfg, dtype=jnp.float32, dp=2, bucket=1024, slots=8, context=4096,
                                  attn_backend="pallas")
    res = count_program(fn, args, kw, "cpu", views=(), compiled=True)
    assert LARGE_CONSTANT_BYTES == 1 << 20 and res["large_constants"] == [], res["large_constants"]
    assert set(res["seconds"]) == {"trace", "lower", "compile"}
