"""Profiler-trace tooling (atom_jax.trace events/report/plot): interval arithmetic,
the classification table, a synthetic GPU-layout xspace, and a real CPU trace captured
in a subprocess with 2 host devices (shard_map all_gather / psum_scatter under mb_a / mb_b)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from atom_jax.trace import intervals as iv
from atom_jax.trace.__main__ import main as trace_main
from atom_jax.trace.categories import (
    ATTENTION, COLLECTIVE, COPY, GEMM, OTHER, classify, micro_batch,
)
from atom_jax.trace.events import Event, find_trace_file, load_trace, normalise, RawEvent
from atom_jax.trace.report import analyse, format_report, report

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- interval arithmetic --------------------------------------------------------------------

def test_union_merges_nested_overlapping_and_adjacent():
    assert iv.union([(5, 6), (0, 10), (2, 3)]) == [(0, 10)]  # nested
    assert iv.union([(0, 2), (1, 4)]) == [(0, 4)]  # overlapping
    assert iv.union([(0, 2), (2, 4)]) == [(0, 4)]  # adjacent
    assert iv.union([(6, 8), (0, 2)]) == [(0, 2), (6, 8)]  # disjoint, unsorted
    assert iv.union([(3, 3), (5, 4)]) == []  # empty and inverted dropped
    assert iv.union([]) == []


def test_total_counts_overlap_once():
    assert iv.total([(0, 10), (5, 15), (20, 25)]) == 20
    assert iv.total([(0, 10), (2, 3)]) == 10
    assert iv.total([]) == 0


def test_intersect_and_subtract():
    a = [(0, 10), (20, 30)]
    b = [(5, 25)]
    assert iv.intersect(a, b) == [(5, 10), (20, 25)]
    assert iv.subtract(a, b) == [(0, 5), (25, 30)]
    assert iv.subtract(b, a) == [(10, 20)]
    # one b interval spanning several a intervals, and b touching a's edges
    assert iv.subtract([(0, 2), (3, 5), (6, 8)], [(1, 7)]) == [(0, 1), (7, 8)]
    assert iv.intersect([(0, 2)], [(2, 4)]) == []
    assert iv.subtract([(0, 2)], [(2, 4)]) == [(0, 2)]
    assert iv.clip([(0, 10)], 3, 4) == [(3, 4)]


@pytest.mark.parametrize("comm, compute, overlapped, exposed", [
    ([(0, 10)], [], 0, 10),  # nothing to hide behind
    ([(0, 10)], [(0, 10)], 10, 0),  # fully hidden
    ([(2, 4)], [(0, 10)], 2, 0),  # collective nested inside a GEMM
    ([(0, 10)], [(2, 4), (6, 8)], 4, 6),  # GEMMs nested inside a collective
    ([(0, 5)], [(5, 10)], 0, 5),  # adjacent: no overlap
    ([(0, 4), (10, 14)], [(2, 12)], 4, 4),  # partial overlap at both ends
    ([(0, 4), (2, 6)], [(3, 5), (4, 8)], 3, 3),  # overlapping collectives on two streams
])
def test_split_communication_cases(comm, compute, overlapped, exposed):
    assert iv.split_communication(comm, compute) == (overlapped, exposed)


def test_split_communication_adds_up_on_random_intervals():
    rng = random.Random(0)

    def rand_intervals(n):
        out = []
        for _ in range(n):
            s = rng.uniform(0, 100)
            out.append((s, s + rng.uniform(0, 15)))
        return out

    for _ in range(200):
        comm, compute = rand_intervals(rng.randint(0, 8)), rand_intervals(rng.randint(0, 8))
        overlapped, exposed = iv.split_communication(comm, compute)
        assert overlapped + exposed == pytest.approx(iv.total(comm))
        assert overlapped == pytest.approx(iv.total(iv.intersect(comm, compute)))
        assert 0 <= overlapped <= min(iv.total(comm), iv.total(compute)) + 1e-9


# --- classification table ---------------------------------------------------------------------

@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", GEMM),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", GEMM),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8", GEMM),
    ("__triton_gemm_fusion_17", GEMM),
    ("dot_general.8", GEMM),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", ATTENTION),
    ("flash_fwd_splitkv_kernel", ATTENTION),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", ATTENTION),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", COLLECTIVE),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", COLLECTIVE),
    ("all-gather-start.3", COLLECTIVE),
    ("reduce_scatter.7", COLLECTIVE),
    ("all-reduce.1", COLLECTIVE),
    ("collective-permute-start", COLLECTIVE),
    ("MemcpyD2D", COPY),
    ("Memset 3", COPY),
    ("loop_transpose_fusion", COPY),
    ("dynamic-update-slice.4", COPY),
    ("loop_concatenate_fusion", COPY),
    ("loop_multiply_fusion", OTHER),
    ("input_reduce_fusion", OTHER),
    ("loop_softmax_fusion", OTHER),  # router softmax is not attention
])
def test_classify_by_name(name, category):
    assert classify([name]) == category


def test_classify_uses_hlo_opcodes_when_names_say_nothing():
    assert classify(["ynn_fusion.1", "ynn_fusion.1"], "fusion", {"parameter", "dot"}) == GEMM
    assert classify(["loop_fusion_3"], "fusion", {"parameter", "transpose", "bitcast"}) == COPY
    # a fusion that computes something besides moving data is not a copy
    assert classify(["loop_fusion_3"], "fusion", {"parameter", "copy", "multiply"}) == OTHER
    assert classify(["custom-call.2"], "custom-call") == OTHER
    assert classify(["custom-call.2", "__cublas$lt$matmul"], "custom-call") == GEMM
    assert classify(["all_gather.3"], "all-gather") == COLLECTIVE
    assert classify(["x.1"], "all-to-all") == COLLECTIVE


def test_kernel_name_decides_before_the_hlo_op_it_came_from():
    # cuDNN attention custom call launching a memset: the memset is a copy
    assert classify(["Memset 3", "__cudnn$fmhaSoftmax", "custom-call.4"], "custom-call") == COPY


def test_micro_batch_attribution():
    assert micro_batch(["jit(step)/shard_map/mb_a/dot_general"]) == "mb_a"
    assert micro_batch(["fusion.3", "jit(step)/mb_b/mul"]) == "mb_b"
    assert micro_batch(["jit(step)/mb_a/x", "jit(step)/mb_b/y"]) == "mixed"
    assert micro_batch(["jit(step)/mlp/dot_general", ""]) == "unknown"
    assert micro_batch(["jit(step)/mb_abc/dot"]) == "unknown"  # a different scope


# --- synthetic GPU-layout xspace ----------------------------------------------------------------

def _gpu_xspace_text() -> str:
    """Two GPUs with a compute and an NCCL stream each, a derived 'XLA Ops' line (must be
    ignored), and two annotated steps on the host python thread. Times in us from 0."""
    stat_ids = {"hlo_op": 1, "name": 2, "step_num": 3, "hlo_module": 4}
    event_ids = {"nvjet_tst_gemm": 1, "ncclDevKernel_AllGather_RING_LL": 2, "loop_fusion": 3,
                 "fusion.9": 4, "step": 5, "MemcpyD2D": 6}

    def meta():
        ev = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}\n'
                     for n, i in event_ids.items())
        st = "".join(f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}\n'
                     for n, i in stat_ids.items())
        return ev + st

    def event(kernel, start_us, dur_us, **stats):
        s = "".join(
            f'stats {{ metadata_id: {stat_ids[k]} '
            + (f"int64_value: {v}" if isinstance(v, int) else f'str_value: "{v}"') + " }"
            for k, v in stats.items())
        return (f"events {{ metadata_id: {event_ids[kernel]} offset_ps: {int(start_us * 1e6)} "
                f"duration_ps: {int(dur_us * 1e6)} {s} }}\n")

    planes = []
    for gpu in range(2):
        compute, comm = [], []
        for step in range(2):
            t0 = 1000 * step + 100
            # mb_a GEMM 0..300, NCCL 200..500 (100 hidden, 200 exposed), mb_b fusion 500..600
            compute.append(event("nvjet_tst_gemm", t0, 300, hlo_op="custom-call.1",
                                 name="jit(step)/layer0/mb_a/dot_general"))
            comm.append(event("ncclDevKernel_AllGather_RING_LL", t0 + 200, 300,
                              hlo_op="all-gather-start.2", name="jit(step)/mb_b/all_gather"))
            compute.append(event("loop_fusion", t0 + 500, 100, hlo_op="fusion.9",
                                 name="jit(step)/layer1/mb_b/add"))
            compute.append(event("MemcpyD2D", t0 + 650, 10))
        ops = [event("fusion.9", 100, 100)]
        planes.append(f"""planes {{ id: {10 + gpu} name: "/device:GPU:{gpu}"
  lines {{ id: 1 name: "Stream #14(Compute)" timestamp_ns: 0 {''.join(compute)} }}
  lines {{ id: 2 name: "Stream #20(Compute)" timestamp_ns: 0 {''.join(comm)} }}
  lines {{ id: 3 name: "XLA Ops" timestamp_ns: 0 {''.join(ops)} }}
  {meta()} }}""")
    steps = [event("step", 1000 * i, 900, step_num=i) for i in range(2)]
    planes.append(f"""planes {{ id: 1 name: "/host:CPU"
  lines {{ id: 1 name: "python" timestamp_ns: 0 {''.join(steps)} }}
  {meta()} }}""")
    return "\n".join(planes)


@pytest.fixture(scope="module")
def gpu_like_trace(tmp_path_factory) -> Path:
    from jax.profiler import ProfileData

    root = tmp_path_factory.mktemp("gpu_trace")
    run = root / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    (run / "gpuhost.xplane.pb").write_bytes(
        ProfileData.text_proto_to_serialized_xspace(_gpu_xspace_text()))
    return root


def test_gpu_layout_parses_streams_and_steps(gpu_like_trace):
    trace = load_trace(gpu_like_trace)
    assert trace.platform == "gpu"
    assert trace.devices == ["/device:GPU:0", "/device:GPU:1"]
    assert [s.num for s in trace.steps] == [0, 1]
    assert all(e.lane.startswith("Stream") for e in trace.events)  # "XLA Ops" not counted
    assert len(trace.events) == 2 * 2 * 4


def test_gpu_layout_report_numbers(gpu_like_trace):
    rep = report(gpu_like_trace)
    d = rep["devices"]["/device:GPU:0"]
    assert d["steps"] == 2 and d["step_source"] == "annotation"
    assert d["step_time_ms"] == pytest.approx(0.9)
    assert d["categories"][GEMM]["union_ms"] == pytest.approx(0.3)
    assert d["categories"][COLLECTIVE]["union_ms"] == pytest.approx(0.3)
    assert d["categories"][COPY]["count"] == 2
    cm = d["communication"]
    assert cm["overlapped_ms"] == pytest.approx(0.1)
    assert cm["exposed_ms"] == pytest.approx(0.2)
    assert cm["overlapped_pct"] == pytest.approx(100 / 3, abs=0.01)
    mbs = d["micro_batches"]
    assert mbs["mb_a"]["by_category_ms"] == {GEMM: pytest.approx(0.3)}
    assert mbs["mb_b"]["by_category_ms"][COLLECTIVE] == pytest.approx(0.3)
    assert mbs["mb_b"]["communication"]["exposed_ms"] == pytest.approx(0.2)
    assert d["top_kernels"][0]["name"] in ("nvjet_tst_gemm", "ncclDevKernel_AllGather_RING_LL")
    assert "communication 0.300 ms" in format_report(rep)
    # period: step starts 1.0 ms apart; busy in [0, 1 ms): GEMM..fusion 100-700 us + copy 10 us
    assert d["step_period_ms"] == pytest.approx(1.0)
    assert d["busy_share_of_period"] == pytest.approx(0.61)
    assert "device busy 61.0% of it" in format_report(rep)
    la = d["launches"]  # gemm (layer0), fusion (layer1), NCCL and copy (no layer) per step
    assert la["per_step"] == 4 and la["short_per_step"] == 0
    assert la["by_layer"] == {"layer0": 1, "layer1": 1} and la["outside_layers_per_step"] == 2
    assert "launches 4.0 per step" in format_report(rep)


def test_launches_per_step_and_layer():
    """Short launches (< 10 us) and launches per decoder layer scope, from op_name metadata."""
    from atom_jax.trace.report import _launches

    rng = np.random.default_rng()
    events, want = [], {}
    for i, layer in enumerate(rng.integers(0, 5, 40)):
        name = f"jit(step)/shard_map/layer{layer}/mb_a/add" if layer < 4 else "jit(step)/argmax"
        events.append(Event("/device:GPU:0", "Stream #1", "loop_fusion", 100.0 * i, 1e3 * (3 + 4 * (i % 4)),
                            {"name": name}))
        key = f"layer{layer}" if layer < 4 else "step"
        want[key] = want.get(key, 0) + 1
    la = _launches(events, 2)
    assert la["per_step"] == 20
    assert la["short_per_step"] == sum(1 for e in events if e.dur_ns < 1e4) / 2  # 3 and 7 us
    assert la["outside_layers_per_step"] == want.pop("step", 0) / 2
    assert la["by_layer"] == {k: v / 2 for k, v in sorted(want.items())}
    assert la["per_layer_max"] == max(want.values()) / 2 and la["layers"] == len(want)


def test_busy_share_of_period_counts_kernels_past_the_annotation():
    """Overlap schedule: the host annotation of a step ends at its launch (0.2 ms) while its
    kernels run on; the annotated share is then meaningless, the period's share is the truth."""
    from atom_jax.trace.events import Step, Trace
    from atom_jax.trace.hlo_index import HloIndex
    rng = random.Random(7)
    period_us, steps = 1000.0, 5
    busy = [rng.uniform(300, 900) for _ in range(steps)]
    raw = [RawEvent("/device:GPU:0", "Stream #1", "nvjet_gemm", 1e3 * (i * period_us + 50), 1e3 * busy[i],
                    {"hlo_op": "c.1"}) for i in range(steps)]
    events, _, platform = normalise(raw, {"/device:GPU:0": ["Stream #1"]})
    marks = [Step(i, 1e3 * i * period_us, 1e3 * 200) for i in range(steps)]
    d = analyse(Trace(Path("x"), "xplane", platform, events, marks, HloIndex(), {}))["devices"]["/device:GPU:0"]
    assert d["step_period_ms"] == pytest.approx(period_us / 1e3)
    # the last step starts the window's end: steps 0..3 count, each wholly inside its period
    assert d["busy_share_of_period"] == pytest.approx(sum(busy[:-1]) / ((steps - 1) * period_us), abs=1e-4)


def test_unannotated_capture_divides_span_by_steps():
    raw = [RawEvent("/device:GPU:0", "Stream #1", "nvjet_gemm", s, 100.0, {"hlo_op": "c.1"})
           for s in (0.0, 1000.0, 2000.0, 3000.0)]
    events, steps, platform = normalise(raw, {"/device:GPU:0": ["Stream #1"]})
    assert steps == [] and platform == "gpu"
    from atom_jax.trace.events import Trace
    from atom_jax.trace.hlo_index import HloIndex
    trace = Trace(Path("x"), "xplane", platform, events, steps, HloIndex(), {})
    d = analyse(trace, steps=4)["devices"]["/device:GPU:0"]
    assert d["step_time_ms"] == pytest.approx(3100 / 4 / 1e6)
    assert d["categories"][GEMM]["union_ms"] == pytest.approx(100 / 1e6)


def test_command_buffer_kernels_map_to_their_hlo_op_by_name():
    """Kernels without an hlo_op stat (launched inside a command buffer) get the HLO op whose kernel
    name they carry (instruction name, '.' -> '_'): in their own program where a stat names it,
    else the op every indexed program agrees on (another bucket's step program may hold the same
    name); layer and micro-batch then come from its op_name, and the report counts the mapped share."""
    from atom_jax.trace.events import Step, Trace
    from atom_jax.trace.hlo_index import HloIndex, HloOpInfo, kernel_name_of

    assert kernel_name_of("input_reduce_fusion.65") == "input_reduce_fusion_65"
    rng = np.random.default_rng()
    layer, n = int(rng.integers(0, 40)), int(rng.integers(2, 999))
    step_ops = {f"input_reduce_fusion.{n}": HloOpInfo(f"input_reduce_fusion.{n}", "fusion",
                                                      f"jit(step)/layer{layer}/mb_b/reduce_sum"),
                "loop_add_fusion": HloOpInfo("loop_add_fusion", "fusion", "jit(step)/layer1/add")}
    other_ops = {"loop_add_fusion": HloOpInfo("loop_add_fusion", "fusion", "jit(add)/add")}
    # another bucket's step program: the same reduce under the same instruction name, another op as fusion.3
    bucket_ops = {f"input_reduce_fusion.{n}": HloOpInfo(f"input_reduce_fusion.{n}", "fusion",
                                                        f"jit(step)/layer{layer}/mb_b/reduce_sum"),
                  "fusion.3": HloOpInfo("fusion.3", "fusion", "jit(step)/layer2/mul")}
    index = HloIndex()
    index.add_module("jit_step", 7, step_ops)
    index.add_module("jit_add", 8, other_ops)
    index.add_module("jit_step", 9, bucket_ops)
    assert index.lookup_kernel(f"input_reduce_fusion_{n}").op_name == step_ops[f"input_reduce_fusion.{n}"].op_name
    assert index.lookup_kernel("loop_add_fusion") is None  # two modules, two different ops: ambiguous
    assert index.lookup_kernel("loop_add_fusion", program_id=8) is other_ops["loop_add_fusion"]  # its own program
    assert index.lookup_kernel("fusion_3") is bucket_ops["fusion.3"]
    assert index.lookup_kernel("fusion_3", program_id=7) is None  # not in that program
    clash = HloIndex()  # two instructions of one module with one kernel name: no guess
    clash.add_module("m", 1, {"fusion.1": HloOpInfo("fusion.1", "fusion", "a"),
                              "fusion_1": HloOpInfo("fusion_1", "fusion", "a")})
    assert clash.lookup_kernel("fusion_1") is None
    lanes = {"/device:GPU:0": ["Stream #1"]}
    raw = [RawEvent("/device:GPU:0", "Stream #1", f"input_reduce_fusion_{n}", 0.0, 3000.0, {}),
           RawEvent("/device:GPU:0", "Stream #1", "loop_add_fusion", 4000.0, 1000.0, {}),
           # an annotated kernel keeps its own lookup: an unknown hlo_op is not guessed from the name
           RawEvent("/device:GPU:0", "Stream #1", f"input_reduce_fusion_{n}", 6000.0, 1000.0, {"hlo_op": "x.1"})]
    events, _, platform = normalise(raw, lanes, index)
    assert events[0].hlo.op_name == step_ops[f"input_reduce_fusion.{n}"].op_name
    assert events[0].layer == f"layer{layer}" and events[0].micro_batch == "mb_b"
    assert events[1].hlo is None and events[2].hlo is None
    trace = Trace(Path("x"), "xplane", platform, events, [Step(0, 0.0, 8000.0)], index, {})
    d = analyse(trace)["devices"]["/device:GPU:0"]
    assert d["hlo_known_share"] == pytest.approx(3000 / 5000)
    assert "HLO op known for 60.0%" in format_report(analyse(trace))


def _pb(*fields) -> bytes:
    """Protobuf wire bytes of (field number, int | str | bytes) pairs (varint or length-delimited)."""
    def varint(n):
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out
    out = b""
    for num, v in fields:
        if isinstance(v, int):
            out += varint(num << 3) + varint(v)
        else:
            v = v.encode() if isinstance(v, str) else v
            out += varint(num << 3 | 2) + varint(len(v)) + v
    return out


def _instr(iid, name, opcode, op_name="", called=(), target="", backend="", shape=b""):
    # HloInstructionProto: name 1, opcode 2, shape 3, metadata 7 (OpMetadata.op_name 2),
    # custom_call_target 28, id 35, called_computation_ids 38, backend_config 43
    return _pb((1, name), (2, opcode), *([(3, shape)] if shape else []), *([(7, _pb((2, op_name)))] if op_name else []),
               *([(28, target)] if target else []), (35, iid), *[(38, c) for c in called],
               *([(43, backend)] if backend else []))


def _step_hlo_proto() -> bytes:
    """A decode step's optimized module as a GPU trace stores it, two layers, in the pattern of a real
    H200 trace: layer 1's norm reuses layer 0's kernel (named input_reduce_fusion_3), each layer runs
    two Pallas kernels named after the kernel ('grouped_gemm', then 'grouped_gemm__1'), a copy
    launches 'memcpy32_post', a sort fusion's kernel is named after its sort, and the logits GEMM
    (outside the layers) fuses an op of layer 1 (shared position arithmetic)."""
    pallas = ('{grid_x = 8 : i32, ir = "ML\\EFR\\0D", name = "grouped_gemm", num_warps = 4 : i32}')
    fused = [(10, "fused_norm", [_instr(100, "reduce.1", "reduce", "jit(step)/layer0/reduce_sum")]),
             (11, "fused_norm.1", [_instr(101, "reduce.2", "reduce", "jit(step)/layer1/reduce_sum")]),
             (12, "fused_sort", [_instr(102, "sort.2.1", "sort", "jit(step)/layer1/top_k")]),
             (13, "fused_dot", [_instr(103, "sub.4", "subtract", "jit(step)/layer1/sub"),
                                _instr(104, "dot.5", "dot", "jit(step)/dot_general")])]
    entry = [  # (id, instruction), listed out of order: the schedule gives the order
        (12, _instr(12, "tuple.10", "tuple")),
        (11, _instr(11, "gemm_fusion_dot.8", "fusion", "jit(step)/dot_general", called=[13])),
        (7, _instr(7, "input_reduce_fusion.7", "fusion", "jit(step)/layer1/reduce_sum", called=[11])),
        (1, _instr(1, "param.0", "parameter")),
        (2, _instr(2, "input_reduce_fusion.3", "fusion", "jit(step)/layer0/reduce_sum", called=[10])),
        *[(i, _instr(i, f"pallas_call.{i}", "custom-call", f"jit(step)/layer{layer}/grouped_gemm/pallas_call",
                     target="__gpu$xla.gpu.triton", backend=pallas)) for i, layer in ((3, 0), (4, 0), (8, 1), (9, 1))],
        (5, _instr(5, "copy.4", "copy")),
        (6, _instr(6, "get-tuple-element.5", "get-tuple-element")),
        (10, _instr(10, "fusion.9", "fusion", "jit(step)/layer1/top_k", called=[12])),
    ]
    comps = [_pb((1, name), *[(2, i) for i in instrs], (5, cid)) for cid, name, instrs in fused]
    comps.append(_pb((1, "main.1"), *[(2, i) for _, i in entry], (5, 1)))
    ids = b"".join(bytes([i]) for i in range(1, 13))  # packed instruction ids 1..12 (each < 128)
    schedule = _pb((1, _pb((1, 1), (2, _pb((1, ids))))))  # computation 1 -> its sequence
    module = _pb((1, "jit_step"), *[(3, c) for c in comps], (6, 1), (7, schedule))
    return _pb((1, module))


STEP_KERNELS = ["input_reduce_fusion_3", "grouped_gemm", "grouped_gemm__1", "memcpy32_post",
                "input_reduce_fusion_3", "grouped_gemm", "grouped_gemm__1", "sort_2_1", "gemm_fusion_dot_8"]
STEP_LAUNCH_ORDER = ["input_reduce_fusion.3", "pallas_call.3", "pallas_call.4", "copy.4", "input_reduce_fusion.7",
                     "pallas_call.8", "pallas_call.9", "fusion.9", "gemm_fusion_dot.8"]


def _graph_launch_events(correlation: int, t0: float, kernels=STEP_KERNELS) -> list[RawEvent]:
    """One CUDA-graph launch of the step program as a trace records it: every kernel tagged with the
    command buffer's thunk as hlo_op, the graph, its node and the launch's correlation id."""
    return [RawEvent("/device:GPU:0", "Stream #14(Compute)", k, t0 + 3000.0 * i, 2000.0,
                     {"hlo_op": "command_buffer_1", "hlo_module": "jit_step", "program_id": 5,
                      "cuda_graph_id": 62, "cuda_graph_node_id": 266287972352 + i, "correlation_id": correlation})
            for i, k in enumerate(kernels)]


def test_graph_launches_give_each_step_its_whole_work():
    """Overlap schedule with command buffers: a step's host annotation closes early while its graph
    launch runs on, so per-window busy time drops kernels; one launch (correlation id) of the step
    program holds the step's whole work (without host launch events, one launch is taken as one
    execution). A launch cut by the capture's end and a smaller program's launches do not count."""
    from atom_jax.trace.events import Step, Trace
    from atom_jax.trace.hlo_index import HloIndex

    rng = random.Random()
    starts = [40_000.0 * i + rng.uniform(0, 5_000) for i in range(4)]
    raw = [e for i, t0 in enumerate(starts) for e in _graph_launch_events(10 + i, t0)]
    raw += _graph_launch_events(99, 170_000.0, STEP_KERNELS[:4])  # cut by the capture's end
    raw += [RawEvent(e.plane, e.line, e.name, e.start_ns, 100.0, {**e.stats, "program_id": 6, "correlation_id": 7})
            for e in _graph_launch_events(0, 200_000.0)]  # another program, less kernel time
    events, _, platform = normalise(raw, {"/device:GPU:0": ["Stream #14(Compute)"]})
    marks = [Step(i, t0 - 1_000.0, 10_000.0) for i, t0 in enumerate(starts)]
    d = analyse(Trace(Path("x"), "xplane", platform, events, marks, HloIndex(), {}))["devices"]["/device:GPU:0"]
    n = len(STEP_KERNELS)
    busy_ns, span_ns = 2_000.0 * n, 3_000.0 * (n - 1) + 2_000.0
    each = d["executions"].pop("each")
    assert d["executions"] == {"program_id": 5, "hlo_module": "jit_step", "executions": 4, "partial": 1, "kernels": n,
                               "busy_ms": busy_ns / 1e6, "span_ms": span_ns / 1e6,
                               "busy_share_of_span": round(busy_ns / span_ns, 4)}
    # each execution in run order, with the idle since the previous one's last kernel
    assert each == [{"busy_ms": round(busy_ns / 1e6, 3), "span_ms": round(span_ns / 1e6, 3),
                     "gap_ms": None if i == 0 else round((starts[i] - starts[i - 1] - span_ns) / 1e6, 3)}
                    for i in range(4)]
    assert d["busy_ms"] < 0.5 * busy_ns / 1e6  # the windows saw only each launch's first kernels
    assert "per execution of jit_step (4 whole, 1 cut; 9 kernels each): busy 0.018 ms" in format_report(
        {"trace": "x", "source": "xplane", "platform": platform, "annotated_steps": [], "compiled_steps": [],
         "hlo_modules": [], "devices": {"/device:GPU:0": d}})


def test_command_buffer_launch_maps_kernels_by_schedule_place():
    """Real H200 decode trace (XLA command buffers): kernels carry hlo_op 'command_buffer_1' (no
    instruction of the stored module), and a kernel's name does not say which instruction ran it
    (reused kernels, Pallas and runtime names). One graph node per launching instruction of the entry
    schedule does: each kernel gets the instruction at its place, so layers come out per launch."""
    from atom_jax.trace.events import Step, Trace
    from atom_jax.trace.hlo_index import HloIndex, parse_hlo_proto
    from atom_jax.trace.report import _launches

    name, ops, orders = parse_hlo_proto(_step_hlo_proto())
    assert name == "jit_step" and orders == [STEP_LAUNCH_ORDER]
    assert ops["pallas_call.3"].backend_kernel == "grouped_gemm" and ops["copy.4"].backend_kernel == ""
    index = HloIndex()
    index.add_module(name, 5, ops, orders)
    index.add_module("jit_step", 6, dict(ops), [])  # another bucket's program of the same name
    raw = _graph_launch_events(1, 0.0) + _graph_launch_events(2, 100_000.0)
    random.Random(3).shuffle(raw)  # node order, not list order
    lanes = {"/device:GPU:0": ["Stream #14(Compute)"]}
    events, _, platform = normalise(raw, lanes, index)
    for corr in (1, 2):
        launch = sorted((e for e in events if e.stats["correlation_id"] == corr),
                        key=lambda e: e.stats["cuda_graph_node_id"])
        assert [e.hlo.name for e in launch] == STEP_LAUNCH_ORDER
        # the logits GEMM fuses a layer-1 op but its own op_name is outside the layers
        assert [e.layer for e in launch] == ["layer0"] * 3 + ["step"] + ["layer1"] * 4 + ["step"]
    la = _launches(events, 2)
    assert la["by_layer"] == {"layer0": 3, "layer1": 4} and la["outside_layers_per_step"] == 2
    trace = Trace(Path("x"), "xplane", platform, events, [Step(0, 0.0, 200_000.0)], index, {})
    assert analyse(trace)["devices"]["/device:GPU:0"]["hlo_known_share"] == 1.0

    # a launch of part of the program maps where only one stretch fits; one layer's kernels fit
    # either layer's stretch, so none of them is placed
    assert [o.name for o in index.lookup_launch(STEP_KERNELS[5:], 5)] == STEP_LAUNCH_ORDER[5:]
    assert index.lookup_launch(STEP_KERNELS[:3], 5) == [None] * 3

    # An instruction that launched nothing (the copy's node missing) leaves the rest in place.
    kernels = STEP_KERNELS[:3] + STEP_KERNELS[4:]
    events, _, _ = normalise(_graph_launch_events(3, 0.0, kernels), lanes, index)
    assert [e.hlo.name for e in events] == STEP_LAUNCH_ORDER[:3] + STEP_LAUNCH_ORDER[4:]
    # a kernel named after another kind of instruction cannot take the copy's place: it alone is
    # left unplaced (not guessed by its name: that op runs at the end)
    kernels = [k if k != "memcpy32_post" else "gemm_fusion_dot_8" for k in STEP_KERNELS]
    events, _, _ = normalise(_graph_launch_events(4, 0.0, kernels), lanes, index)
    assert [e.hlo.name if e.hlo else None for e in events] == [
        n if n != "copy.4" else None for n in STEP_LAUNCH_ORDER]
    # a stray kernel is left out rather than made a fusion's second kernel
    events, _, _ = normalise(_graph_launch_events(5, 0.0, STEP_KERNELS + ["other_kernel"]), lanes, index)
    assert [e.hlo.name if e.hlo else None for e in events] == STEP_LAUNCH_ORDER + [None]
    # a program stored without a schedule: each kernel by its name where launched once
    raw = [RawEvent(e.plane, e.line, e.name, e.start_ns, e.dur_ns, {**e.stats, "program_id": 6})
           for e in _graph_launch_events(6, 0.0, ["gemm_fusion_dot_8"] + ["input_reduce_fusion_3"] * 2)]
    events, _, _ = normalise(raw, lanes, index)
    assert [e.hlo.name if e.hlo else None for e in events] == ["gemm_fusion_dot.8", None, None]


def _prefill_hlo_proto() -> bytes:
    """A two-layer prefill step's module in the pattern of a real H200 prefill trace, which XLA runs
    as several command buffers with thunks between them: a cub sort (a custom call outside any
    graph) and a conditional whose branches (one per size bucket, the same fusions at other shapes)
    run their own command buffers. cuBLAS calls launch library kernels (some after a Memset), a copy
    launches 'memcpy32_post', layer 1's norm reuses layer 0's kernel 'fusion_1' (an identical fusion:
    same shape and fused ops), and each layer's Pallas grouped GEMM is the kernel 'grouped_gemm'."""
    gemm = '{grid_x = 8 : i32, name = "grouped_gemm", num_warps = 4 : i32}'
    topk = '{grid_x = 1 : i32, name = "topk", num_warps = 4 : i32}'
    s8, s4 = _pb((1, 11), (2, 8)), _pb((1, 11), (2, 4))  # ShapeProto: element type, one dimension
    fused = [(10, [_instr(100, "mul.1", "multiply", "jit(step)/layer0/mul")]),
             (11, [_instr(101, "mul.2", "multiply", "jit(step)/layer1/mul")]),
             (12, [_instr(102, "add.1", "add", "jit(step)/layer1/cond/branch_0_fun/add")]),
             (13, [_instr(103, "add.2", "add", "jit(step)/layer1/cond/branch_1_fun/add")])]
    lib = "__cublas$lt$matmul"
    entry = [
        _instr(1, "param.0", "parameter"),
        _instr(2, "fusion.1", "fusion", "jit(step)/layer0/norm", called=[10], shape=s8),
        _instr(3, "custom-call.1", "custom-call", "jit(step)/layer0/dot_general", target=lib),
        _instr(4, "custom-call.2", "custom-call", "jit(step)/layer0/dot_general", target=lib),
        _instr(5, "copy.1", "copy"),
        _instr(6, "custom-call.3", "custom-call", "jit(step)/layer0/sort", target="xla.gpu.ext.cub_sort_pairs"),
        _instr(7, "pallas_call.7", "custom-call", "jit(step)/layer0/grouped_gemm/pallas_call",
               target="__gpu$xla.gpu.triton", backend=gemm),
        _instr(8, "fusion.2", "fusion", "jit(step)/layer1/norm", called=[11], shape=s8),
        _instr(9, "custom-call.4", "custom-call", "jit(step)/layer1/dot_general", target=lib),
        _instr(10, "cond.1", "conditional", "jit(step)/layer1/cond", called=[20, 21]),
        _instr(11, "pallas_call.11", "custom-call", "jit(step)/layer1/grouped_gemm/pallas_call",
               target="__gpu$xla.gpu.triton", backend=gemm),
        _instr(12, "fusion.3", "fusion", "jit(step)/layer1/add", called=[12], shape=s4),
    ]
    branches = [(20, [_instr(21, "loop_add_fusion", "fusion", "jit(step)/layer1/cond/branch_0_fun/add",
                             called=[12], shape=s8),
                      _instr(22, "pallas_call.22", "custom-call", "jit(step)/layer1/cond/branch_0_fun/topk",
                             target="__gpu$xla.gpu.triton", backend=topk)]),
                (21, [_instr(31, "loop_add_fusion.1", "fusion", "jit(step)/layer1/cond/branch_1_fun/add",
                             called=[13], shape=s4),
                      _instr(32, "pallas_call.32", "custom-call", "jit(step)/layer1/cond/branch_1_fun/topk",
                             target="__gpu$xla.gpu.triton", backend=topk)])]
    comps = [_pb(*[(2, i) for i in instrs], (5, cid)) for cid, instrs in fused]
    comps += [_pb((1, "main"), *[(2, i) for i in entry], (5, 1))]
    comps += [_pb(*[(2, i) for i in instrs], (5, cid)) for cid, instrs in branches]

    def sequence(comp, ids):
        return (1, _pb((1, comp), (2, _pb((1, bytes(ids))))))
    schedule = _pb(sequence(1, range(1, 13)), sequence(20, [21, 22]), sequence(21, [31, 32]))
    return _pb((1, _pb((1, "jit_step"), *[(3, c) for c in comps], (6, 1), (7, schedule))))


# One execution of the prefill step: (correlation id, launched inside a CUDA graph, [(kernel, graph node)]),
# in launch order. Graph nodes as XLA numbers them: a cuBLAS call's kernels (child-graph nodes) after
# all of the command buffer's own nodes, so node order is not run order.
PREFILL_LAUNCHES = [
    (10, True, [("fusion_1", 0), ("nvjet_tss_64x256_NNN", 5), ("Memset 0", 6), ("nvjet_tst_128x160_NNT", 7),
                ("memcpy32_post", 3)]),
    (11, False, [("Memset 3", None)]),  # the cub sort: a thunk of its own, with its hlo_op
    (12, False, [("void cub::DeviceRadixSortOnesweepKernel", None)]),
    (13, True, [("grouped_gemm", 0), ("fusion_1", 1), ("Memset 0", 4), ("nvjet_tst_128x160_NNT", 5)]),
    (14, False, [("MemcpyD2H", None)]),  # the conditional's predicate
    (15, True, [("loop_add_fusion", 0), ("topk", 1)]),  # branch 0's command buffer
    (16, True, [("grouped_gemm", 0), ("fusion_3", 1)]),
]
PREFILL_OPS = ["fusion.1", "custom-call.1", "custom-call.2", "custom-call.2", "copy.1", "custom-call.3",
               "custom-call.3", "pallas_call.7", "fusion.2", "custom-call.4", "custom-call.4", "cond.1",
               "loop_add_fusion", "pallas_call.22", "pallas_call.11", "fusion.3"]


def _prefill_raw(run_id=77, t0=0.0, launches=PREFILL_LAUNCHES, ran=None, corr0=0) -> list[RawEvent]:
    """Host and device events of one execution: the host launches everything within 0.5 ms (inside
    a 1 ms step annotation), the device runs each kernel for 100 us, one after another, from 0.2 ms:
    most of them after the annotation closes. `ran`: the correlation ids that reached the device
    (the rest were cut by the capture's end); `corr0` offsets the correlation ids (unique in a trace)."""
    dev, host = [], [RawEvent("/host:CPU", "python", "step", t0, 1e6, {"step_num": run_id}),
                     RawEvent("/host:CPU", "python", "PjRtLoadedExecutable::Execute", t0 + 1e4, 5e5,
                              {"run_id": run_id})]
    t = t0 + 2e5
    for n, (corr, graph, kernels) in enumerate(launches):
        corr += corr0
        host.append(RawEvent("/host:CPU", "python", "cuGraphLaunch" if graph else kernels[0][0], t0 + 2e4 * (n + 1),
                             5e3, {"correlation_id": corr, "context_id": "$$1", "device_id": 0}))
        if ran is not None and corr not in ran:
            continue
        hlo_op = PREFILL_OPS[sum(len(k) for _, _, k in launches[:n])]
        for kernel, node in kernels:
            stats = {"correlation_id": corr, "context_id": "$$1", "program_id": 5, "hlo_module": "jit_step",
                     "hlo_op": f"command_buffer_{corr}" if graph else hlo_op}
            if graph:
                stats.update(cuda_graph_id=corr, cuda_graph_node_id=(corr << 32) + node)
            dev.append(RawEvent("/device:GPU:0", "Stream #14(Compute)", kernel, t, 1e5, stats))
            t += 1e5
    return host + dev


def _prefill_trace(raw):
    from atom_jax.trace.events import Trace
    from atom_jax.trace.hlo_index import HloIndex, parse_hlo_proto
    from atom_jax.trace.launches import host_launches

    name, ops, orders = parse_hlo_proto(_prefill_hlo_proto())
    index = HloIndex()
    index.add_module(name, 5, ops, orders)
    lanes = {"/device:GPU:0": ["Stream #14(Compute)"], "/host:CPU": ["python"]}
    launches = host_launches(raw)
    events, steps, platform = normalise(raw, lanes, index, launches)
    return Trace(Path("x"), "xplane", platform, events, steps, index, lanes, launches.by_run)


def test_prefill_command_buffers_map_every_kernel_to_its_instruction():
    """A prefill step XLA split into command buffers around a cub sort and a conditional: each graph
    launch's kernels, in the order they ran, align to a stretch of the entry schedule or of a branch's;
    cuBLAS kernels (numbered after the graph's own nodes, some after a Memset) take their custom
    call's place, so every kernel's layer is known and each grouped GEMM launch gets its own layer."""
    trace = _prefill_trace(_prefill_raw())
    ran = sorted(trace.events, key=lambda e: e.start_ns)
    assert [e.hlo.name if e.hlo else None for e in ran] == PREFILL_OPS
    gemms = [e for e in ran if e.name == "grouped_gemm"]
    assert [e.layer for e in gemms] == ["layer0", "layer1"]
    assert [e.layer for e in ran if e.name == "fusion_1"] == ["layer0", "layer1"]  # one kernel, two layers
    d = analyse(trace, top=20)["devices"]["/device:GPU:0"]
    assert d["hlo_known_share"] == 1.0
    top = {k["name"]: k for k in d["top_kernels"]}
    assert top["grouped_gemm"]["layers"] == ["layer0", "layer1"]
    assert "layer0-1" in format_report(analyse(trace, top=20))


def test_branch_kernels_take_the_branch_whose_shapes_match():
    """Size-bucket branches hold the same fusions at other shapes: only the branch whose fusion
    XLA compiled the kernel for can have run it, so the launch places in that branch; a
    same-named fusion of another shape cannot reuse the kernel."""
    from atom_jax.trace.hlo_index import HloIndex, parse_hlo_proto
    index = HloIndex()
    name, ops, orders = parse_hlo_proto(_prefill_hlo_proto())
    assert orders[1:] == [["loop_add_fusion", "pallas_call.22"], ["loop_add_fusion.1", "pallas_call.32"]]
    index.add_module(name, 5, ops, orders)
    placed = index.lookup_launch(["loop_add_fusion", "topk"], 5)
    assert [o.name for o in placed] == ["loop_add_fusion", "pallas_call.22"]
    # were branch 1's fusion of branch 0's shape (an identical fusion), the launch could be either branch
    same = dict(ops, **{"loop_add_fusion.1": dataclasses.replace(ops["loop_add_fusion.1"],
                                                                 shape=ops["loop_add_fusion"].shape,
                                                                 fused_opcodes=ops["loop_add_fusion"].fused_opcodes)})
    index.add_module("other", 6, same, orders)
    assert index.lookup_launch(["loop_add_fusion", "topk"], 6) == [None, None]


def test_a_step_owns_the_kernels_it_launched_past_its_annotation():
    """The host launches a prefill step's kernels within its 1 ms annotation and returns; the device
    runs them for 1.6 ms from 0.2 ms. Each kernel belongs to the step that launched it (its correlation
    id's host call is inside the window): the step's busy time is all of them, and its one execution
    (the PjRt run_id around the launches) spans every graph launch and thunk between them."""
    trace = _prefill_trace(_prefill_raw())
    d = analyse(trace)["devices"]["/device:GPU:0"]
    n = sum(len(k) for _, _, k in PREFILL_LAUNCHES)
    assert d["events"] == n
    assert d["busy_ms"] == pytest.approx(n * 0.1)  # 1.6 ms, not the 0.8 ms that start inside the window
    assert d["device_after_step_ms"] == pytest.approx(0.2 + n * 0.1 - 1.0)
    assert d["executions"]["executions"] == 1 and d["executions"]["partial"] == 0
    assert d["executions"]["kernels"] == n and d["executions"]["busy_ms"] == pytest.approx(n * 0.1)
    text = format_report(analyse(trace))
    assert "per execution of jit_step (1 whole, 0 cut; 16 kernels each)" in text
    assert "a step's kernels run on 0.800 ms past its window" in text


def test_an_execution_cut_by_the_capture_is_not_whole():
    """A second execution whose last graph launch never reached the device (the capture stopped) is
    cut: its host launched a correlation id no device event carries."""
    raw = _prefill_raw() + _prefill_raw(run_id=78, t0=5e6, ran={110, 111, 112, 113}, corr0=100)
    x = analyse(_prefill_trace(raw))["devices"]["/device:GPU:0"]["executions"]
    assert (x["executions"], x["partial"], x["kernels"]) == (1, 1, 16)


def test_bench_trace_summary_names_every_layer_of_a_shared_kernel(monkeypatch):
    """The long-context bench's summary of a trace: a kernel name that ran in several layers (the
    grouped GEMM, one per layer) is labelled with all of them, never with the last one seen; a
    kernel no op was found for is '?', not 'step'."""
    from atom_jax.bench import long_context
    from atom_jax.trace import events as events_mod
    from atom_jax.trace.categories import layers_label

    assert layers_label(["layer3"]) == "layer3" and layers_label(["layer2", "layer0", "layer1"]) == "layer0-2"
    assert layers_label(["layer0", "layer2", "step", "?"]) == "layer0,2+step+?"
    raw = _prefill_raw()
    raw.append(RawEvent("/device:GPU:0", "Stream #14(Compute)", "mystery_kernel", 9e6, 1e5, {}))
    monkeypatch.setattr(events_mod, "load_trace", lambda path: _prefill_trace(raw))
    s = long_context.trace_summary("unused", steps=1)
    k = {t["name"]: t for t in s["top_kernels"]}
    assert k["grouped_gemm"]["layer"] == "layer0-1" and k["grouped_gemm"]["count"] == 2
    assert k["grouped_gemm"]["op_name"] == "jit(step)/layer*/grouped_gemm/pallas_call"
    assert k["topk"]["layer"] == "layer1" and k["mystery_kernel"]["layer"] == "?"
    assert s["by_layer_category_ms"]["?/other"] == pytest.approx(0.1)
    assert s["busy_ms"] == pytest.approx(1.7)


# --- a real CPU trace ---------------------------------------------------------------------------

CAPTURE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from atom_jax.trace.capture import MB_A, MB_B, micro_batch_scope, profile_steps

    assert len(jax.devices()) == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(x, w):
        with micro_batch_scope(MB_A):
            g = jax.lax.all_gather(x, "x", tiled=True)
            h = jnp.tanh(g @ w) @ w
        with micro_batch_scope(MB_B):
            y = jax.lax.psum_scatter(h @ w, "x", tiled=True)
        return y

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x")))
    x = jnp.ones((256, 256), jnp.float32)
    w = jnp.full((256, 256), 1e-3, jnp.float32)
    run = profile_steps(sys.argv[1], lambda: step(x, w), steps=3)
    print("steps", run.step_seconds)
""")


@pytest.fixture(scope="module")
def cpu_trace(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("cpu_trace")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(log_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return log_dir


def test_cpu_trace_events_and_hlo(cpu_trace):
    assert find_trace_file(cpu_trace).name.endswith(".xplane.pb")
    trace = load_trace(cpu_trace)
    assert trace.platform == "cpu" and trace.source == "xplane"
    assert trace.devices == ["/device:CPU:0", "/device:CPU:1"]
    assert [s.num for s in trace.steps] == [0, 1, 2]
    assert any(m.startswith("jit_") for m in trace.hlo.module_names)
    assert "/host:CPU" in trace.lanes
    cats = {e.category for e in trace.events}
    assert {GEMM, COLLECTIVE} <= cats
    gemms = [e for e in trace.events if e.category == GEMM]
    assert all(e.hlo is not None for e in gemms)  # classified through the HLO module
    assert {e.micro_batch for e in gemms} == {"mb_a", "mb_b"}
    collectives = {e.micro_batch for e in trace.events if e.category == COLLECTIVE}
    assert collectives == {"mb_a", "mb_b"}  # all-gather under mb_a, reduce-scatter under mb_b


def test_cpu_trace_report_and_json(cpu_trace, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    assert trace_main(["report", str(cpu_trace), "--json", str(out_json), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "/device:CPU:0" in printed and "gemm" in printed
    rep = json.loads(out_json.read_text())
    assert set(rep["devices"]) == {"/device:CPU:0", "/device:CPU:1"}
    for d in rep["devices"].values():
        assert d["events"] > 0
        assert d["step_time_ms"] > 0 and d["steps"] == 3
        assert d["categories"][GEMM]["union_ms"] > 0
        cm = d["communication"]
        assert cm["total_ms"] > 0
        assert cm["overlapped_ms"] + cm["exposed_ms"] == pytest.approx(cm["total_ms"], abs=1e-5)
        assert {"mb_a", "mb_b"} <= set(d["micro_batches"])
        assert 0 < len(d["top_kernels"]) <= 3


def test_cpu_trace_chrome_json_fallback(cpu_trace):
    (chrome,) = cpu_trace.glob("plugins/profile/*/*.trace.json.gz")
    trace = load_trace(chrome)
    assert trace.source == "chrome"
    assert trace.devices == ["/device:CPU:0", "/device:CPU:1"]
    assert len(trace.steps) == 3
    assert any(e.category == COLLECTIVE for e in trace.events)


def test_cpu_trace_plot_writes_png(cpu_trace, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "timeline.png"
    assert trace_main(["plot", str(cpu_trace), "-o", str(out), "--step", "1"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_report_cli_subprocess(cpu_trace):
    proc = subprocess.run([sys.executable, "-m", "atom_jax.trace", "report", str(cpu_trace)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "communication" in proc.stdout


def test_event_properties():
    e = Event("/device:GPU:0", "Stream #1", "loop_fusion", 10.0, 5.0,
              {"hlo_op": "fusion.1", "name": "jit(f)/mb_b/mul"})
    assert e.end_ns == 15.0 and e.hlo_op == "fusion.1"
    assert e.category == OTHER and e.micro_batch == "mb_b"


TBO_STEP_CAPTURE = textwrap.dedent("""
    import sys
    import numpy as np
    from atom_jax.config import tiny
    from atom_jax.loader import random_model
    from atom_jax.sharding import StepOptions, make_dp_mesh, make_step
    from atom_jax.sharding.step import shard_tokens
    from atom_jax.trace.capture import profile_steps

    model = random_model(tiny(), seed=0)
    mesh = make_dp_mesh(2)
    step, params = make_step(model, mesh, StepOptions())
    ids = shard_tokens(np.random.default_rng(0).integers(0, 512, (2, 24)), mesh)
    profile_steps(sys.argv[1], lambda: step(params, ids, tbo=True), steps=2)
""")


def test_tbo_step_trace_is_attributed_to_both_micro_batches(tmp_path):
    """The real TBO step names its chains: a captured trace splits GEMMs and collectives into
    mb_a and mb_b (what `trace report` and `trace plot` colour by)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", TBO_STEP_CAPTURE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = load_trace(tmp_path)
    gemm_mbs = {e.micro_batch for e in trace.events if e.category == GEMM}
    comm_mbs = {e.micro_batch for e in trace.events if e.category == COLLECTIVE}
    assert {"mb_a", "mb_b"} <= gemm_mbs
    assert {"mb_a", "mb_b"} <= comm_mbs
    per_mb = analyse(trace)["devices"]["/device:CPU:0"]["micro_batches"]
    assert per_mb["mb_a"]["busy_ms"] > 0 and per_mb["mb_b"]["busy_ms"] > 0


def test_steps_that_compile_are_flagged(tmp_path):
    import jax
    import jax.numpy as jnp

    from atom_jax.trace.capture import STEP_NAME

    n = random.randrange(100, 1000)  # a shape no cache has seen
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0)
    jax.profiler.start_trace(str(tmp_path))
    try:
        for i in range(2):  # step 0 compiles, step 1 reuses the program
            with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=i):
                f(jnp.ones(n)).block_until_ready()
    finally:
        jax.profiler.stop_trace()
    rep = report(tmp_path)
    assert rep["compiled_steps"] == [0]
    first, second = rep["annotated_steps"]
    assert first["compile_ms"] > 0 and second["compile_ms"] == 0
    assert first["compile_ms"] <= first["ms"]
    assert "WARNING: step 0" in format_report(rep)


def test_a_warmed_capture_has_no_compiled_steps(cpu_trace):
    assert report(cpu_trace)["compiled_steps"] == []


def test_plot_without_matplotlib_prints_the_install_line(cpu_trace, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert trace_main(["plot", str(cpu_trace), "-o", str(tmp_path / "t.png")]) == 2
    assert "pip install 'atom_jax[trace]'" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()
