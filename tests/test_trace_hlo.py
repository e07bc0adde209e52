"""HLO overlap check (atom_jax.trace.hlo): hand-written scheduled-HLO snippets in the forms
XLA GPU prints (checked against real jax 0.11.2 / H100 output), plus a real CPU compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from atom_jax.trace import analyze_hlo, compiled_text
from atom_jax.trace.__main__ import main as trace_main
from atom_jax.trace.hlo import parse_hlo_module, shape_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

# Backend configs as XLA GPU prints them (trimmed to the fields that matter here).
ASYNC_CFG = ('backend_config={"operation_queue_id":"0","wait_on_operation_queues":[],'
             '"collective_backend_config":{"is_sync":false,"no_parallel_custom_call":false,'
             '"is_pipelined":false},"force_earliest_schedule":false}')
SYNC_CFG = ASYNC_CFG.replace('"is_sync":false', '"is_sync":true')

# A GEMM fusion's computation and a collective reducer, shared by the snippets below.
COMMON_COMPUTATIONS = """
%add.clone (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %add.1 = bf16[] add(%x, %y)
}

%fused_computation.3 (param_0.1: bf16[512,2048], param_1.1: bf16[2048,1024]) -> bf16[512,1024] {
  %param_0.1 = bf16[512,2048]{1,0} parameter(0)
  %param_1.1 = bf16[2048,1024]{1,0} parameter(1)
  ROOT %dot.7 = bf16[512,1024]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(moe)/dot_general"}
}

%fused_multiply (param_0.2: bf16[512,1024]) -> bf16[512,1024] {
  %param_0.2 = bf16[512,1024]{1,0} parameter(0)
  %constant_1 = bf16[] constant(2)
  %broadcast.1 = bf16[512,1024]{1,0} broadcast(%constant_1), dimensions={}
  ROOT %multiply.1 = bf16[512,1024]{1,0} multiply(%param_0.2, %broadcast.1)
}
"""


def module(entry_body: str, extra: str = "", header: str = "HloModule jit_moe, is_scheduled=true") -> str:
    """A scheduled module: header, shared computations, extra computations, ENTRY."""
    return (
        f"{header}\n{COMMON_COMPUTATIONS}\n{textwrap.dedent(extra)}\n"
        "ENTRY %main.42_spmd (param.1: bf16[256,2048], param.2: bf16[2048,1024], param.3: bf16[512,2048]) -> bf16[512,1024] {\n"
        f"{textwrap.dedent(entry_body)}}}\n"
    )


def only(report, kind):
    matches = [c for c in report.collectives if c.kind == kind]
    assert len(matches) == 1, report.format_table()
    return matches[0]


# ---- hand-written scheduled HLO ------------------------------------------------------------

OVERLAPPED_AG = module(f"""\
  %param.1 = bf16[256,2048]{{1,0}} parameter(0), sharding={{devices=[2,1]<=[2]}}
  %param.2 = bf16[2048,1024]{{1,0}} parameter(1), sharding={{replicated}}
  %param.3 = bf16[512,2048]{{1,0}} parameter(2), sharding={{replicated}}
  %all-gather-start = (bf16[256,2048]{{1,0}}, bf16[512,2048]{{1,0}}) all-gather-start(%param.1), channel_id=1, replica_groups={{{{0,1}}}}, dimensions={{0}}, use_global_device_ids=true, metadata={{op_name="jit(moe)/shard_map/all_gather"}}, {ASYNC_CFG}
  %custom-call.2 = (bf16[512,1024]{{1,0}}, s8[33554432]{{0}}) custom-call(%param.3, %param.2), custom_call_target="__cublas$gemm", backend_config={{"gemm_backend_config":{{"alpha_real":1,"beta":0}}}}
  %get-tuple-element.3 = bf16[512,1024]{{1,0}} get-tuple-element(%custom-call.2), index=0
  %fusion.3 = bf16[512,1024]{{1,0}} fusion(%param.3, %param.2), kind=kCustom, calls=%fused_computation.3, backend_config={{"fusion_backend_config":{{"kind":"__triton_nested_gemm_fusion"}}}}
  %all-gather-done = bf16[512,2048]{{1,0}} all-gather-done(%all-gather-start), metadata={{op_name="jit(moe)/shard_map/all_gather"}}
  ROOT %loop_multiply_fusion = bf16[512,1024]{{1,0}} fusion(%fusion.3), kind=kLoop, calls=%fused_multiply
""")


def test_overlapped_all_gather_counts_cublas_and_dot_fusion():
    report = analyze_hlo(OVERLAPPED_AG)
    ag = only(report, "all-gather")
    assert ag.name == "all-gather-start" and ag.done == "all-gather-done"
    assert ag.computation == "main.42_spmd" and ag.form == "start-done"
    assert not ag.is_sync
    assert ag.gemm_names == ["custom-call.2", "fusion.3"]
    assert ag.gemms_between == 2 and ag.instructions_between == 3
    assert ag.overlapped
    assert ag.bytes == 512 * 2048 * 2 and ag.shape.startswith("bf16[512,2048]")
    assert ag.op_name == "jit(moe)/shard_map/all_gather"
    assert (report.total, report.overlapped, report.sync_count) == (1, 1, 0)
    assert report.not_overlapped() == []


def test_sync_marked_collective_is_not_overlapped_even_with_gemm_between():
    report = analyze_hlo(OVERLAPPED_AG.replace(ASYNC_CFG, SYNC_CFG))
    ag = only(report, "all-gather")
    assert ag.is_sync and ag.gemms_between == 2 and not ag.overlapped
    assert report.sync_count == 1 and report.overlapped == 0
    assert [c.name for c in report.not_overlapped()] == ["all-gather-start"]


def test_all_reduce_with_only_elementwise_work_between():
    text = module(f"""\
  %param.3 = bf16[512,2048]{{1,0}} parameter(2)
  %param.2 = bf16[2048,1024]{{1,0}} parameter(1)
  %fusion.3 = bf16[512,1024]{{1,0}} fusion(%param.3, %param.2), kind=kCustom, calls=%fused_computation.3
  %all-reduce-start = bf16[512,1024]{{1,0}} all-reduce-start(%fusion.3), channel_id=2, replica_groups={{{{0,1}}}}, use_global_device_ids=true, to_apply=%add.clone, {ASYNC_CFG}
  %loop_multiply_fusion = bf16[512,1024]{{1,0}} fusion(%fusion.3), kind=kLoop, calls=%fused_multiply
  %all-reduce-done = bf16[512,1024]{{1,0}} all-reduce-done(%all-reduce-start)
  ROOT %add.9 = bf16[512,1024]{{1,0}} add(%all-reduce-done, %loop_multiply_fusion)
""")
    ar = only(analyze_hlo(text), "all-reduce")
    assert not ar.is_sync
    assert ar.gemms_between == 0 and ar.instructions_between == 1
    assert not ar.overlapped


# XLA GPU wraps reduce-scatter in an async computation; printed either raw (async-start,
# calls=) or with syntax sugar (reduce-scatter-start, optionally with -update ops).
RS_WRAPPED = """\
%async_computation.1 (param_0.9: bf16[512,1024]) -> bf16[256,1024] {
  %param_0.9 = bf16[512,1024]{1,0} parameter(0)
  ROOT %reduce-scatter.4 = bf16[256,1024]{1,0} reduce-scatter(%param_0.9), channel_id=3, replica_groups={{0,1}}, use_global_device_ids=true, dimensions={0}, to_apply=%add.clone, metadata={op_name="jit(moe)/shard_map/reduce_scatter"}
}
"""


def test_reduce_scatter_via_async_start_done():
    text = module(f"""\
  %param.3 = bf16[512,2048]{{1,0}} parameter(2)
  %param.2 = bf16[2048,1024]{{1,0}} parameter(1)
  %loop_multiply_fusion = bf16[512,1024]{{1,0}} fusion(%param.3), kind=kLoop, calls=%fused_multiply
  %reduce-scatter-start = ((bf16[512,1024]{{1,0}}), bf16[256,1024]{{1,0}}) async-start(bf16[512,1024]{{1,0}} %loop_multiply_fusion), calls=%async_computation.1, {ASYNC_CFG}
  %triton_gemm = bf16[512,1024]{{1,0}} fusion(%param.3, %param.2), kind=kCustom, calls=%triton_gemm_computation, backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm","triton_gemm_config":{{"block_m":"64"}}}}}}
  %reduce-scatter-done = bf16[256,1024]{{1,0}} async-done(((bf16[512,1024]{{1,0}}), bf16[256,1024]{{1,0}}) %reduce-scatter-start), calls=%async_computation.1
  ROOT %tuple = (bf16[256,1024]{{1,0}}, bf16[512,1024]{{1,0}}) tuple(%reduce-scatter-done, %triton_gemm)
""", extra=RS_WRAPPED + """
%triton_gemm_computation (p0: bf16[512,2048], p1: bf16[2048,1024]) -> bf16[512,1024] {
  %p0 = bf16[512,2048]{1,0} parameter(0)
  %p1 = bf16[2048,1024]{1,0} parameter(1)
  ROOT %convert.1 = bf16[512,1024]{1,0} convert(%p0)
}
""")
    report = analyze_hlo(text)
    # The inner plain reduce-scatter belongs to the async pair: reported once, not as sync.
    rs = only(report, "reduce-scatter")
    assert rs.form == "async-start-done" and rs.name == "reduce-scatter-start"
    assert rs.done == "reduce-scatter-done"
    assert rs.gemm_names == ["triton_gemm"]  # via "__triton_gemm", not via a dot
    assert rs.overlapped and rs.bytes == 256 * 1024 * 2
    assert rs.op_name == "jit(moe)/shard_map/reduce_scatter"


def test_sugared_reduce_scatter_start_with_update():
    text = module("""\
  %param.3 = bf16[512,2048]{1,0} parameter(2)
  %param.2 = bf16[2048,1024]{1,0} parameter(1)
  %fusion.3 = bf16[512,1024]{1,0} fusion(%param.3, %param.2), kind=kCustom, calls=%fused_computation.3
  %reduce-scatter-start = ((bf16[512,1024]{1,0}), bf16[256,1024]{1,0}) reduce-scatter-start(%fusion.3), channel_id=3, replica_groups={{0,1}}, dimensions={0}, to_apply=%add.clone
  %reduce-scatter-update = ((bf16[512,1024]{1,0}), bf16[256,1024]{1,0}) reduce-scatter-update(%reduce-scatter-start)
  %custom-call.5 = (bf16[512,1024]{1,0}, s8[4194304]{0}) custom-call(%param.3, %param.2), custom_call_target="__cublas$lt$matmul"
  ROOT %reduce-scatter-done = bf16[256,1024]{1,0} reduce-scatter-done(%reduce-scatter-update)
""")
    rs = only(analyze_hlo(text), "reduce-scatter")
    assert rs.form == "start-done" and rs.done == "reduce-scatter-done"
    assert rs.gemm_names == ["custom-call.5"] and rs.overlapped
    assert not rs.is_sync  # no backend_config at all: nothing marks it sync


def test_start_done_inside_while_body():
    body = f"""\
%region_0.1_spmd (param: (s32[], bf16[512,2048], bf16[2048,1024])) -> (s32[], bf16[512,2048], bf16[2048,1024]) {{
  %param = (s32[], bf16[512,2048]{{1,0}}, bf16[2048,1024]{{1,0}}) parameter(0)
  %get-tuple-element.1 = s32[] get-tuple-element(%param), index=0
  %get-tuple-element.2 = bf16[512,2048]{{1,0}} get-tuple-element(%param), index=1
  %get-tuple-element.3 = bf16[2048,1024]{{1,0}} get-tuple-element(%param), index=2
  %slice.1 = bf16[256,2048]{{1,0}} slice(%get-tuple-element.2), slice={{[0:256], [0:2048]}}
  %all-gather-start.1 = (bf16[256,2048]{{1,0}}, bf16[512,2048]{{1,0}}) all-gather-start(%slice.1), channel_id=4, replica_groups={{{{0,1}}}}, dimensions={{0}}, frontend_attributes={{trivially_pipelineable=""}}, {ASYNC_CFG}
  %gemm_fusion_dot.2 = bf16[512,1024]{{1,0}} fusion(%get-tuple-element.2, %get-tuple-element.3), kind=kCustom, calls=%fused_computation.3
  %all-gather-done.1 = bf16[512,2048]{{1,0}} all-gather-done(%all-gather-start.1)
  ROOT %tuple.9 = (s32[], bf16[512,2048]{{1,0}}, bf16[2048,1024]{{1,0}}) tuple(%get-tuple-element.1, %all-gather-done.1, %get-tuple-element.3)
}}

%region_1.2_spmd (param.1: (s32[], bf16[512,2048], bf16[2048,1024])) -> pred[] {{
  %param.1 = (s32[], bf16[512,2048]{{1,0}}, bf16[2048,1024]{{1,0}}) parameter(0)
  %get-tuple-element.17 = s32[] get-tuple-element(%param.1), index=0
  %constant.5 = s32[] constant(4)
  ROOT %lt.1 = pred[] compare(%get-tuple-element.17, %constant.5), direction=LT
}}
"""
    text = module("""\
  %param.3 = bf16[512,2048]{1,0} parameter(2)
  %param.2 = bf16[2048,1024]{1,0} parameter(1)
  %constant.0 = s32[] constant(0)
  %tuple.7 = (s32[], bf16[512,2048]{1,0}, bf16[2048,1024]{1,0}) tuple(%constant.0, %param.3, %param.2)
  %while.9 = (s32[], bf16[512,2048]{1,0}, bf16[2048,1024]{1,0}) while(%tuple.7), condition=%region_1.2_spmd, body=%region_0.1_spmd, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %get-tuple-element.19 = bf16[512,2048]{1,0} get-tuple-element(%while.9), index=1
""", extra=body)
    report = analyze_hlo(text)
    ag = only(report, "all-gather")
    assert ag.computation == "region_0.1_spmd"
    assert ag.name == "all-gather-start.1" and ag.done == "all-gather-done.1"
    assert ag.gemm_names == ["gemm_fusion_dot.2"] and ag.overlapped


def test_triton_collective_fusion_start_and_non_collective_async_fusion():
    # jax 0.11.2 on H100 emits small all-reduces as a Triton collective kernel launched
    # through fusion-start/-done, and also uses fusion-start for plain async dynamic slices.
    extra = """\
%fused_psum.clone (param_0.2: bf16[524288]) -> bf16[524288] {
  %param_0.2 = bf16[524288]{0} parameter(0)
  ROOT %psum.7 = bf16[524288]{0} all-reduce(%param_0.2), channel_id=1, replica_groups=mesh['dp'=2] {'dp'}, use_global_device_ids=true, to_apply=%add.clone, backend_config={"collective_backend_config":{"is_sync":false,"kernel_strategy":"KERNEL_STRATEGY_TRITON_TWO_SHOT"}}
}

%fused_dynamic_slice.clone (param_0.10: bf16[4,512,2048], param_1.6: s32[]) -> bf16[1,512,2048] {
  %param_0.10 = bf16[4,512,2048]{2,1,0} parameter(0)
  %param_1.6 = s32[] parameter(1)
  %constant_2 = s32[] constant(0)
  ROOT %dynamic_slice.3 = bf16[1,512,2048]{2,1,0} dynamic-slice(%param_0.10, %param_1.6, %constant_2, %constant_2), dynamic_slice_sizes={1,512,2048}
}
"""
    text = module("""\
  %param.3 = bf16[512,2048]{1,0} parameter(2)
  %param.2 = bf16[2048,1024]{1,0} parameter(1)
  %bitcast = bf16[524288]{0} bitcast(%param.2)
  %fusion-start = ((bf16[524288]{0}), bf16[524288]{0}) fusion-start(%bitcast), kind=kCustom, calls=%fused_psum.clone, backend_config={"fusion_backend_config":{"kind":"__triton_collective"}}
  %gemm_fusion_dot.1 = bf16[512,1024]{1,0} fusion(%param.3, %param.2), kind=kCustom, calls=%fused_computation.3
  %fusion-done = bf16[524288]{0} fusion-done(%fusion-start)
  %constant.1 = s32[] constant(1)
  %broadcast.2 = bf16[4,512,2048]{2,1,0} broadcast(%param.3), dimensions={1,2}
  %fusion-start.1 = ((bf16[4,512,2048]{2,1,0}, s32[]), bf16[1,512,2048]{2,1,0}, u32[]) fusion-start(%broadcast.2, %constant.1), kind=kLoop, calls=%fused_dynamic_slice.clone
  %fusion-done.1 = bf16[1,512,2048]{2,1,0} fusion-done(%fusion-start.1)
  ROOT %tuple = (bf16[524288]{0}, bf16[512,1024]{1,0}, bf16[1,512,2048]{2,1,0}) tuple(%fusion-done, %gemm_fusion_dot.1, %fusion-done.1)
""", extra=extra)
    report = analyze_hlo(text)
    assert report.total == 1, report.format_table()  # the dynamic-slice pair is no collective
    ar = only(report, "all-reduce")
    assert ar.form == "fusion-start-done" and ar.name == "fusion-start" and ar.done == "fusion-done"
    assert ar.gemm_names == ["gemm_fusion_dot.1"] and ar.overlapped


def test_plain_collectives_are_synchronous():
    # The form CPU (and GPU after converting a lone async pair to sync) prints.
    text = module("""\
  %param.1 = bf16[256,2048]{1,0} parameter(0)
  %param.2 = bf16[2048,1024]{1,0} parameter(1)
  %all_gather.3 = bf16[512,2048]{1,0} all-gather(%param.1), channel_id=1, replica_groups={{0,1}}, dimensions={0}, use_global_device_ids=true
  %fusion.3 = bf16[512,1024]{1,0} fusion(%all_gather.3, %param.2), kind=kCustom, calls=%fused_computation.3
  ROOT %reduce_scatter.7 = bf16[256,1024]{1,0} reduce-scatter(%fusion.3), channel_id=2, replica_groups={{0,1}}, dimensions={0}, to_apply=%add.clone
""")
    report = analyze_hlo(text)
    assert [(c.kind, c.form, c.is_sync, c.gemms_between) for c in report.collectives] == [
        ("all-gather", "sync", True, 0),
        ("reduce-scatter", "sync", True, 0),
    ]
    assert report.overlapped == 0 and report.sync_count == 2
    assert len(report.not_overlapped()) == 2
    assert report.not_overlapped(min_bytes=10**9) == []  # sizes below the threshold pass


def test_report_serialises_and_formats():
    report = analyze_hlo(OVERLAPPED_AG)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["summary"] == {"total": 1, "overlapped": 1, "sync": 0}
    assert d["collectives"][0]["overlapped"] is True
    table = report.format_table()
    assert "all-gather-start" in table and "collectives: 1  overlapped: 1  sync: 0" in table


def test_parser_and_shape_bytes():
    comps = parse_hlo_module(OVERLAPPED_AG)
    entry = [c for c in comps.values() if c.is_entry]
    assert [c.name for c in entry] == ["main.42_spmd"]
    # Operands with or without printed shapes resolve to names.
    assert comps["main.42_spmd"].instructions[3].operands == ["param.1"]
    tup = parse_hlo_module(module("  ROOT %t = (s32[], s32[]) tuple(s32[] %a, /*index=1*/%b)\n"))
    assert tup["main.42_spmd"].instructions[0].operands == ["a", "b"]
    assert shape_bytes("(bf16[256,2048]{1,0}, f32[8]{0})") == 256 * 2048 * 2 + 32
    assert shape_bytes("f8e4m3fn[128,<=64]{1,0}") == 128 * 64
    assert shape_bytes("f4e2m1fn[3]{0}") == 2
    assert shape_bytes("token[]") is None


def test_cli_on_hand_written_file(tmp_path, capsys):
    hlo = tmp_path / "ag.txt"
    hlo.write_text(OVERLAPPED_AG)
    out = tmp_path / "ag.json"
    assert trace_main(["hlo", str(hlo), "--json", str(out), "--require-overlap"]) == 0
    assert json.loads(out.read_text())["summary"]["overlapped"] == 1
    hlo.write_text(OVERLAPPED_AG.replace(ASYNC_CFG, SYNC_CFG))
    assert trace_main(["hlo", str(hlo), "--require-overlap"]) == 1
    assert "not overlapped" in capsys.readouterr().err


# ---- real compile on CPU (4 simulated devices, in subprocesses so XLA_FLAGS applies) ----------

CPU_CASE = '''
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def build():
    try:
        mesh = jax.make_mesh((4,), ("dp",), axis_types=(jax.sharding.AxisType.Auto,))
    except (TypeError, AttributeError):  # older jax without axis_types
        mesh = jax.make_mesh((4,), ("dp",))

    def body(x, w):
        full = jax.lax.all_gather(x, "dp", axis=0, tiled=True)
        return jax.lax.psum_scatter(full @ w, "dp", scatter_dimension=0, tiled=True)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P("dp")))
    return fn, (jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32))
'''


def _run_cli(args, tmp_path, pythonpath=()):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(REPO_ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "atom_jax.trace", "hlo", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_real_cpu_compile_and_cli(tmp_path):
    (tmp_path / "overlap_case.py").write_text(CPU_CASE)
    hlo, json1, json2 = tmp_path / "cpu.txt", tmp_path / "a.json", tmp_path / "b.json"

    built = _run_cli(["--module", "overlap_case:build", "--save-hlo", str(hlo), "--json", str(json1)],
                     tmp_path, pythonpath=[tmp_path])
    assert built.returncode == 0, built.stderr

    text = hlo.read_text()
    assert "is_scheduled=true" in text
    report = analyze_hlo(text)
    kinds = {c.kind for c in report.collectives}
    assert {"all-gather", "reduce-scatter"} <= kinds, report.format_table()
    # CPU collectives are synchronous: whatever form they take, none overlaps.
    for c in report.collectives:
        assert not c.overlapped and c.is_sync, report.format_table()
    assert json.loads(json1.read_text()) == report.to_dict()

    # The CLI on the saved file: valid JSON, and --require-overlap fails on CPU.
    saved = _run_cli([str(hlo), "--json", str(json2), "--require-overlap"], tmp_path)
    assert saved.returncode == 1, saved.stdout + saved.stderr
    data = json.loads(json2.read_text())
    assert data["summary"]["total"] >= 2 and data["summary"]["overlapped"] == 0
    assert "reduce-scatter" in saved.stdout


def test_compiled_text_accepts_plain_and_jitted_functions():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((4, 4), jnp.float32)
    plain = compiled_text(lambda a: a @ a, x)
    jitted = compiled_text(jax.jit(lambda a: a @ a), x)
    for text in (plain, jitted):
        assert text.startswith("HloModule") and "ENTRY" in text
        assert analyze_hlo(text).total == 0


def _rs_around(kernel_line: str) -> str:
    return module(f"""\
  %param.3 = bf16[512,2048]{{1,0}} parameter(2)
  %param.2 = bf16[2048,1024]{{1,0}} parameter(1)
  %reduce-scatter-start = ((bf16[512,2048]{{1,0}}), bf16[256,2048]{{1,0}}) reduce-scatter-start(%param.3), channel_id=3, replica_groups={{{{0,1}}}}, dimensions={{0}}, to_apply=%add.clone
{kernel_line}
  ROOT %reduce-scatter-done = bf16[256,2048]{{1,0}} reduce-scatter-done(%reduce-scatter-start)
""")


def test_pallas_grouped_gemm_kernel_counts_as_gemm_but_other_kernels_do_not():
    """A Pallas (Triton) kernel is an opaque custom call: it counts when named as a GEMM (our
    grouped GEMM, as it appears in a real H200 compile), not when it is e.g. a softmax."""
    gemm = ('  %pallas_call.113 = bf16[512,1024]{1,0} custom-call(%param.3, %param.2), '
            'custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(body)/shard_map/'
            'grouped_gemm/pallas_call" scheduling_name="pallas_call.113"}, backend_config={'
            '"name":"grouped_gemm","ir":"..."}')
    rs = only(analyze_hlo(_rs_around(gemm)), "reduce-scatter")
    assert rs.gemm_names == ["pallas_call.113"] and rs.overlapped
    other = gemm.replace("grouped_gemm", "row_softmax")
    rs = only(analyze_hlo(_rs_around(other)), "reduce-scatter")
    assert rs.gemm_names == [] and not rs.overlapped
