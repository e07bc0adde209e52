"""bench sass (atom_jax/bench/sass.py): the Triton modules taken from a program lowered for cuda on
this CPU (no pip Triton needed), the SASS loop finder on hand-written SASS, and, where pip Triton
is installed, one kernel compiled for sm_90a."""

from __future__ import annotations

import pytest

from atom_jax.bench import sass
from atom_jax.bench.__main__ import build_parser
from atom_jax.bench.long_context import attention_tiles
from atom_jax.kernels import sparse_attention as sa

SMALL = dict(tokens=64, start=1000, heads=16, dim=64, window=16, selected=32)


@pytest.mark.parametrize("mode", ["all", "list", "none"])
def test_attention_lowers_to_triton_modules_with_dots(mode):
    tiles = attention_tiles("16x16x4x2")
    [mod] = sass.attention_modules(tiles, mode, SMALL)
    assert mod.name == f"sparse_attention_{mode}"
    assert (mod.num_warps, mod.num_stages) == (4, 2)
    assert mod.grid == (SMALL["tokens"], 1, 1)  # one program per token, one head block, splits 1
    assert mod.ttir.startswith("module") and "tt.func public" in mod.ttir
    assert mod.ttir.count("tt.dot") >= 2  # the scores and P.V per key block (per loop)
    assert ("scf.for" in mod.ttir) and (("tt.load" in mod.ttir))


def _acc_type(tiles, dims):
    """The MLIR type of one accumulator piece (the P.V dots' result)."""
    rows, cols = tiles.block_h, dims["dim"] // tiles.dim_chunks
    return f"tensor<{cols}x{rows}xf32>" if tiles.transpose else f"tensor<{rows}x{cols}xf32>"


@pytest.mark.parametrize("spec", ["16x16x4", "16x16x4x1x0x1x1x2"])  # plain; transposed in 2 head-dim pieces
@pytest.mark.parametrize("mode", ["all", "list", "none"])
def test_attention_pv_dots_fold_into_their_accumulator(spec, mode):
    """Pallas writes every dot as tt.dot(a, b, 0); the online-softmax update's P.V dots must keep
    the shape Triton's combine pattern folds into tt.dot(p, v, acc * alpha): zero accumulator, one
    use, an add (checked here on the Pallas TTIR, no pip Triton needed)."""
    tiles = attention_tiles(spec)
    [mod] = sass.attention_modules(tiles, mode, SMALL)
    dots = sass.dot_accumulators(mod.ttir)
    assert all(d["zero_acc"] for d in dots)
    pv = [d for d in dots if d["type"] == _acc_type(tiles, SMALL)]
    sites = 1 if mode == "none" else 2  # the window's update [and the entries']
    assert len(pv) == sites * tiles.dim_chunks and all(d["folds"] for d in pv)


def test_attention_dots_accumulate_after_triton_passes():
    pytest.importorskip("triton", reason="pip Triton is not installed (`pip install triton`): no TTIR passes")
    tiles = attention_tiles("16x16x4")
    [mod] = sass.attention_modules(tiles, "all", SMALL)
    dots = sass.dot_accumulators(sass.ttir_passes(mod.ttir))
    pv = [d for d in dots if d["type"] == _acc_type(tiles, SMALL)]
    assert len(pv) == 2 and not any(d["zero_acc"] for d in pv)  # tt.dot(p, v, acc * alpha)
    assert any(d["zero_acc"] for d in dots)  # the scores start from zero


def test_w4a16_lowers_to_one_triton_module():
    [mod] = sass.w4a16_modules("flash_up", 8)
    assert mod.name.startswith("w4a16_grouped_gemm") and "tt.dot" in mod.ttir


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   STL.64 [R1+0x8], R4 ;
        /*0040*/                   LDL.LU.128 R8, [R1+0x10] ;
        /*0050*/              @!P0 BRA `(.L_x_1) ;
        /*0060*/                   LDSM.16.M88.4 R12, [R3] ;
        /*0070*/               @P1 BRA `(.L_x_0) ;
        /*0080*/                   LDL R6, [R1] ;
.L_x_2:
        /*0090*/                   STL [R1], R6 ;
        /*00a0*/                   LDS.U16 R7, [R3] ;
        /*00b0*/               @P2 BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   BRA `(.L_x_3);
"""


def test_sass_loops_and_counts():
    instrs, labels = sass.parse_sass(SASS)
    assert len(instrs) == 14 and labels == {".L_x_0": 0x10, ".L_x_1": 0x20, ".L_x_2": 0x90, ".L_x_3": 0xd0}
    # the outer loop (.L_x_0) holds .L_x_1's and is not innermost; the trap after EXIT is no loop
    assert sass.loops(instrs, labels) == [(2, 5), (9, 11)]
    got = sass.sass_counts(SASS)
    first, last = got["loops"]
    assert first["instructions"] == 4 and first["HGMMA"] == 1 and (first["STL"], first["LDL"]) == (1, 1)
    assert (first["spill_store_B"], first["spill_load_B"]) == (8, 16)
    assert got["hot_loop"] == last and (last["spill_store_B"], last["LDS"], last["LDG"]) == (4, 1, 0)
    code = got["code"]
    assert code["instructions"] == 14 and code["LDG"] == 1 and code["LDS"] == 2 and code["spill_load_B"] == 20


def test_parse_ptxas():
    log = ("ptxas info    : Function properties for k\n    1448 bytes stack frame, 2508 bytes spill stores, "
           "3080 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 1448 bytes cumulative stack")
    assert sass.parse_ptxas(log) == dict(registers=255, spill_store_B=2508, spill_load_B=3080, stack_B=1448)


def test_cli_registered_and_parses_tiles_as_bench_attention():
    args = build_parser(["sass"]).parse_args(["sass", "--tiles", "default,64x128x8x1x0x1x1x4", "--modes", "all"])
    cases = list(sass._cases(args))
    assert [c[1]["tiles"] for c in cases] == ["default", "64x128x8x1x0x1x1x4"]
    with pytest.raises(SystemExit):
        list(sass._cases(build_parser(["sass"]).parse_args(["sass", "--tiles", "64x"])))


def test_compile_for_sm90a():
    pytest.importorskip("triton", reason="pip Triton is not installed (`pip install triton`): no offline compile")
    [mod] = sass.attention_modules(sa.AttentionTiles(block_h=16, block_k=16, num_warps=4), "all", SMALL)
    r = sass.compile_module(mod)
    assert 0 < r["registers"] <= 255 and r["shared_B"] > 0 and r["spill_store_B"] is not None
    assert r["hot_loop"]["HGMMA"] + r["hot_loop"]["HMMA"] > 0 and "ttg." in r["ttgir"]
    assert r["dots"] == 4 and r["zero_acc_dots"] == 2  # window and entries: scores from 0, P.V into the accumulator
