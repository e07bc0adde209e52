"""W4A16 dropless grouped GEMM in Pallas for the Triton backend (NVIDIA and ROCm): bf16 rows
times FP4 expert weights (`packed.Fp4Weights`: e2m1 codes + one ue8m0 scale per 32 inputs),
decoded to bf16 inside the kernel, float32 accumulate.

The work list, masking, in-place rows/output and zero range are exactly those of the bf16 kernel
(`pallas_grouped_gemm`): only the K loop differs. Each K step reads a [block_k/2, block_n] tile of
code bytes and its [block_k/32, block_n] scales, decodes the low nibbles (even inputs) and the
high nibbles (odd inputs) into two bf16 tiles, and multiplies them by the matching halves of the
rows, which the wrapper has reordered once with the even columns first (`packed.split_even_odd`),
so both halves are contiguous loads and no in-register interleave is needed. With `row_ids` the
A tiles are gathered, x[row_ids[r]], as in the bf16 kernel (the even/odd reorder is then a pass
over x's R rows, not over the M gathered ones). `epilogue` as in the bf16 kernel.

`TileConfig.swap_ab` selects the "swap AB" product of small-M decode kernels (TRT-LLM,
FlashInfer MoE): each K step computes out^T [block_n, block_m] += W^T . A^T, so the decoded
weight tile is the MMA's A operand (which Hopper's wgmma and mma can take from registers) and
the work item's few rows its N side (block_m 8 or 16 with no padding to wgmma's 64 rows); the
float32 accumulator is transposed once per work item before the epilogue and the store. Same
work list, decoders, gather and epilogue; not a default until a GPU measures it
(`python -m atom_jax.bench w4a16 --decode-sweep`).

`TileConfig.gemv` selects the decode variant without the MMA: each K step adds, for each of the
work item's block_m rows (1-16: the work list cuts larger groups into block_m-row items, each
streaming the group's weights again), x[row, k] * w[k, :] in float32 to per-thread partial sums
(`_gemv_accumulate`): one CUDA-core FMA per weight and row on the decoded values where their
load left them, no trip through shared memory into an MMA operand layout (which held the MMA
variants at 34-40% of copy bandwidth at decode), one reduction over K per work item. Same work
list, gather, epilogue and zero range; `default_tiles` selects it below GEMV_MAX_ROWS_PER_GROUP
rows per expert (0, never, until `bench w4a16 --decode-sweep` measures it on a GPU). Its issue
budget is tight: compiled offline for sm_90a (pip Triton 3.9 on this kernel's TTIR, not XLA's
Triton, so indicative only), its K loop issues 9.4 SASS instructions per weight at block_m 4
(4 FFMA, ~4.7 for the decode and its scales), 6.9 at block_m 2, the MMA kernel's (16x128x256)
5.5; streaming 80% of an H200's copy bandwidth (3.2 TB/s of 0.53-byte weights) leaves ~5.5
(132 SMs x 4 warp-instructions per clock), so expect it issue-bound near 40-45% of copy at 3-4
rows per expert unless the decode gets much cheaper (no CUDA-core FMA on Hopper takes bf16
inputs with a float32 sum, so the FMAs alone cost one instruction per weight and row).

K-major codes (`packed.Fp4WeightsKMajor`: [G, N, K/2], the checkpoint's own orientation, made
once at load by `packed.to_k_major`) run the same MMA kernels (plain and swap-AB; not the GEMV):
each K step reads the [block_n, block_k/2] code tile and transposes it (`.T`, a view), the rest
unchanged, results bit for bit those of the [K/2, N] codes. Why: Triton decodes in the MMA
operand layout, where each thread holds four K-consecutive code bytes of one column; from the
[K/2, N] layout's shared-memory tile those are four byte loads (LDS.U8) and three byte permutes
to pack them, from the K-major tile one 32-bit load (ldmatrix). Compiled offline for sm_90a (pip
Triton 3.9 on this kernel's TTIR, not XLA's Triton: indicative only), the K loop's SASS
instructions per weight (per thread), registers per thread and blocks per SM (by registers;
128 threads, 64 at 2 warps), with the `ptx` decoder before and after its cut to one permute,
shift and mask per two weights (below):

  tiles (m x n x k, warps/stages)   [K/2, N] codes                K-major codes
                                    decoder: before    after      before        after
  16x128x256 4/3 (DECODE_TILES)     6.2 189r 2b     5.5 160r 3b   5.0 208r 2b   4.5 164r 3b
  16x128x256 4/2                    6.0 186r 2b     5.5 164r 3b   5.0 191r 2b   4.5 161r 3b
  16x64x256 4/3                     6.6 120r 4b     6.0  96r 5b   5.5 123r 4b   5.0  97r 4b
  16x64x256 4/2                     6.3 101r 4b     5.6  96r 5b   5.4 106r 4b   4.9  98r 4b
  16x128x128 4/3                    6.3 144r 3b     5.8 127r 4b   5.2 143r 3b   4.8 125r 4b
  16x64x256 2/3                     6.2 188r 5b     5.6 180r 5b   5.0 243r 4b   4.5 168r 6b
  swap-AB 8x128x256 4/3 (wgmma)     8.3             7.8 253r 2b   5.5 245r 2b   4.9 216r 2b
  swap-AB 8x64x256 2/3 (mma.sync)                   8.2 246r 4b                 3.7 125r 8b
  swap-AB 8x64x128 2/3                                                          3.9  94r 10b
  swap-AB 8x128x128 2/3                                                         3.7 159r 6b
  swap-AB 16x64x256 2/3                                                         4.3 168r 6b

With the one-multiply decoder (`one_multiply=True`, below; "after" column's code layout):
16x128x256 4/3 5.0 162r 3b ([K/2, N]), 3.9 163r 3b (K-major); 16x64x256 4/2 5.2 102r 4b;
16x128x128 4/3 5.3 128r 4b; K-major swap-AB 8x64x256 2/3 3.2 127r 8b, 2/2 3.1 161r 6b,
8x128x128 2/3 3.2 161r 6b.

(80% of an H200's copy bandwidth leaves ~5.5 per weight. The best: K-major swap-AB at 1-2 warps,
where Triton keeps Hopper's mma.sync (wgmma wants 4-warp groups): the decoded weights are its A
operand straight from the decoder's registers and the rows its B operand, 4 K-values per thread
as the MMA takes them, so no register moves. What remains at 16x128x256, K-major:
the decode ~2.6 per weight with its two bf16 multiplies 1.0, the A operand's register moves
~0.75 (IMAD.MOV/MOV: Triton loads the bf16 rows 4 K-values per thread, kWidth 4 from the 8-bit
codes, and ptxas gathers the MMA fragments per instruction), the MMA 0.25, the scales ~0.3; the
IMAD count of the issue's 395 was these moves and the decoder's shifts, IMAD.SHL, not address
arithmetic: the loop's address math is a few IADD3/LEA per step.) Candidates of `bench w4a16
--decode-sweep` (`w4a16_kmajor`); measured on an H200 (2026-12-01) K-major codes were 1.5x faster at
64 tokens per rank and 1.17x at 256, so the engine holds its experts K-major on GPU
(`--expert-layout`; tiles: `default_tiles(..., k_major=True)`).

Two decoders compute the same bf16 values. `alu` (ROCm, interpret mode) builds float32 bits with
integer ops, about 18 operations per weight; it made the kernel ALU-bound at 0.3 TB/s of packed
bytes on an H200 (the bf16 kernel streams 3.6 TB/s). `ptx` (CUDA) decodes four code bytes per
inline-assembly instance per half (even / odd inputs), about 2.6 operations per weight: one byte
permute per two bytes, which also replicates each nibble's sign above it, then one shift and
one mask per two weights put sign and magnitude bits where a bf16 holds them (value = e2m1 *
2**-126, subnormal for the e2m1 subnormal 0.5), one multiply by 2**126 makes them exact e2m1
values, a second applies the ue8m0 scale (two multiplies so that scales above 2**1 cannot
overflow).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from atom_jax.kernels import packed
from atom_jax.kernels.pallas_grouped_gemm import (DECODE_MAX_ROWS_PER_GROUP, TileConfig, a_tiles, epilogue_operands,
                                                  from_group_sizes, num_rows, padded_a, split_refs, with_zero_range,
                                                  work_item, work_items)

# block_k counts inputs (codes tile = block_k / 2 bytes); it must be a multiple of 32 (whole
# scale groups). The fastest of `python -m atom_jax.bench w4a16 --sweep` on 1x H200 with the
# PTX decoder (2026-11-30, V4-Flash up projection, docs/benchmarks.md): 64 tokens/rank 0.412 ms
# (16x256x256: 0.459), 8192 tokens/rank 3.350 ms (128x128x128, 8 warps: 3.750).
DECODE_TILES = TileConfig(block_m=16, block_n=128, block_k=256, num_warps=4, num_stages=3)
PREFILL_TILES = TileConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
# The GEMV variant's tiles (not yet measured on a GPU: `bench w4a16 --decode-sweep` times others)
# and the rows per expert below which `default_tiles` picks it: 0 (never) until measured.
GEMV_TILES = TileConfig(block_m=4, block_n=128, block_k=64, num_warps=4, num_stages=1, gemv=True)
GEMV_MAX_ROWS_PER_GROUP = 0.0
GEMV_MAX_BLOCK_M = 16  # rows per GEMV work item (unrolled; each holds block_n/threads partial sums per thread)


# K-major codes (`packed.Fp4WeightsKMajor`, the engine's `--expert-layout kmajor`) at decode: the
# bests of `python -m atom_jax.bench w4a16 --tokens 64,256 --shapes flash_up --decode-sweep` on
# 1x H200 (2026-12-01, docs/benchmarks.md "Issue 19: W4A16 decode with K-major codes"; V4-Flash
# up projection, 128 experts per rank): 64 tokens/rank (3 rows per expert) swap-AB 8x128x256
# 4 warps 3 stages 0.204 ms, 68% of copy bandwidth ([K/2, N] codes' best 0.305 ms, 46%); 256
# tokens/rank (12 rows) swap-AB 16x64x256 2 warps 3 stages 0.292 ms, 50% (plain 16x64x256 4/3
# 0.294; [K/2, N] 0.342 ms, 43%). Between the two measured sizes the switch is at their
# geometric middle, 6 rows per expert. From 32 rows per expert K-major codes keep PREFILL_TILES
# (prefill with K-major codes unmeasured: `bench w4a16 --tokens 8192 --kernels w4a16,w4a16_kmajor`).
KMAJOR_DECODE_TILES_SMALL = TileConfig(block_m=8, block_n=128, block_k=256, num_warps=4, num_stages=3, swap_ab=True)
KMAJOR_DECODE_TILES = TileConfig(block_m=16, block_n=64, block_k=256, num_warps=2, num_stages=3, swap_ab=True)
KMAJOR_SMALL_MAX_ROWS_PER_GROUP = 6.0


def default_tiles(rows_per_group: float, k_major: bool = False) -> TileConfig:
    """The tiles for this many rows per expert (the routing's mean) and code layout (`k_major`:
    `packed.Fp4WeightsKMajor`, which runs the MMA tiles only)."""
    if not k_major and rows_per_group < GEMV_MAX_ROWS_PER_GROUP:
        return GEMV_TILES
    if rows_per_group >= DECODE_MAX_ROWS_PER_GROUP:
        return PREFILL_TILES
    if k_major:
        return KMAJOR_DECODE_TILES_SMALL if rows_per_group < KMAJOR_SMALL_MAX_ROWS_PER_GROUP else KMAJOR_DECODE_TILES
    return DECODE_TILES


# Four code bytes in $2 (elements e0..e3), their bf16 scales in $3 (e0, e1) and $4 (e2, e3); out
# $0/$1 bf16x2 values of the low (even-input) or the high (odd-input) nibbles. c: the codes with
# the half's nibbles in each byte's top (<< NIB: 4 for the low nibbles, 0 for the high ones);
# prmt puts two bytes in the two 16-bit lanes, each above its own sign (selector nibbles 8-B
# replicate a byte's top bit: the nibble's sign), so one shift by 2 and one mask (0x81C081C0)
# leave each lane's sign at bf16's sign bit and its magnitude in bf16's exponent-low /
# mantissa-high bits. (One instance per half: Pallas' Triton lowering of jax 0.10 mishandles
# inline assembly with several results.)
_PTX_DECODE = """{
.reg .b32 c, t, d, k, z;
mov.b32 k, 0x7E807E80;
mov.b32 z, 0x80008000;
shl.b32 c, $2, NIB;
prmt.b32 t, c, 0, 0x9180; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 $0, d, $3, z;
prmt.b32 t, c, 0, 0xB3A2; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 $1, d, $4, z;
}"""


def _decode_ptx(codes, scales):
    """codes uint8 [Kh, N], scales uint8 [Kh/16, N] -> (even, odd) bf16 [Kh, N] via `_PTX_DECODE`."""
    sc = jax.lax.bitcast_convert_type(scales.astype(jnp.int16) << 7, jnp.bfloat16)  # 2**(s-127); s=0 -> 0
    return _asm_halves(_PTX_DECODE, [codes, packed.expand_rows(sc, packed.FP4_BLOCK // 2)], jnp.bfloat16,
                       "=r,=r,r,r,r")


NIBBLE_SHIFTS = {"even": 4, "odd": 0}  # each half's nibble to its byte's top: the low (even inputs) by 4


def half_asm(template: str, half: str) -> str:
    """A decoder's inline assembly for the "even" (low nibble) or "odd" (high nibble) half."""
    return template.replace("NIB", str(NIBBLE_SHIFTS[half]))


def _asm_halves(template: str, args, dtype, constraints: str):
    """(even, odd) [Kh, N] `dtype` from a decoder's inline assembly over four code bytes at a
    time: one instance per half (`half_asm`)."""
    out = jax.ShapeDtypeStruct(args[0].shape, dtype)

    def half(name):
        return plt.elementwise_inline_asm(half_asm(template, name), args=args, constraints=constraints, pack=4,
                                          result_shape_dtypes=[out])[0]

    return half("even"), half("odd")


def _decode_alu(codes, scales):
    even, odd = packed.fp4_decode_halves(codes, scales)
    return even.astype(jnp.bfloat16), odd.astype(jnp.bfloat16)


DECODERS = {"alu": _decode_alu, "ptx": _decode_ptx}

# The one-multiply decoders (`grouped_gemm(..., one_multiply=True)`, a candidate of `bench w4a16
# --decode-sweep`): `_PTX_DECODE` without its multiply by 2**126, the scale folded in instead,
# 2**(s - 1 - ONE_MUL_SHIFT), so the decoded weights are the true ones times 2**-ONE_MUL_SHIFT and
# the float32 sums are multiplied back once per work item: half the decoder's bf16 multiplies
# (0.5 SASS instructions per weight). Exact (the same products, the same float32 sums scaled by a
# power of two) for the ue8m0 scale bytes ONE_MUL_SCALE_BYTES (2**-116 .. 2**17), while the scaled
# sums stay in float32's normal range (above 2**-126); other scale bytes give wrong values.
ONE_MUL_SHIFT = 16
ONE_MUL_SCALE_BYTES = (11, 144)
_PTX_DECODE_1MUL = _PTX_DECODE.replace("fma.rn.bf16x2 d, d, k, z; ", "")


def _one_mul_scales(scales):
    """uint8 ue8m0 bytes s -> bf16 2**(s - 1 - ONE_MUL_SHIFT): 2**126 (the decoder's subnormal
    placement) times the scale times 2**-ONE_MUL_SHIFT (one multiply-add on the byte; s = 0 gives
    2**-127 here, 0 in the other decoders: outside ONE_MUL_SCALE_BYTES)."""
    return jax.lax.bitcast_convert_type((scales.astype(jnp.int16) << 7) + ((126 - ONE_MUL_SHIFT) << 7), jnp.bfloat16)


def _decode_ptx_1mul(codes, scales):
    sc = packed.expand_rows(_one_mul_scales(scales), packed.FP4_BLOCK // 2)
    return _asm_halves(_PTX_DECODE_1MUL, [codes, sc], jnp.bfloat16, "=r,=r,r,r,r")


def _decode_alu_1mul(codes, scales):
    even, odd = packed.fp4_decode_halves(codes, scales)  # exact float32; the bf16 of it / 2**SHIFT is exact
    return ((even * 2.0 ** -ONE_MUL_SHIFT).astype(jnp.bfloat16), (odd * 2.0 ** -ONE_MUL_SHIFT).astype(jnp.bfloat16))


ONE_MUL_DECODERS = {"alu": _decode_alu_1mul, "ptx": _decode_ptx_1mul}


def one_multiply_fits(weights) -> bool:
    """Whether `one_multiply=True` is exact for these weights' scales (concrete arrays)."""
    s = jnp.asarray(weights.scales)
    lo, hi = ONE_MUL_SCALE_BYTES
    return bool(jnp.all((s >= lo) & (s <= hi)))

# The GEMV's decode (`_decode_ptx_f32`): `_PTX_DECODE`'s bit logic for four code bytes in $4,
# their four scale bytes in $5 (one per code byte: prmt spreads two to the 16-bit lanes, << 7
# makes each the bf16 2**(s - 127)), and the four float32 values out in $0..$3 (a bf16 pair
# widened by one shift or mask each), as the float32 FMAs take them.
_PTX_DECODE_F32 = """{
.reg .b32 c, t, d, k, z, s0, s1;
mov.b32 k, 0x7E807E80;
mov.b32 z, 0x80008000;
prmt.b32 s0, $5, 0, 0x4140; shl.b32 s0, s0, 7; prmt.b32 s1, $5, 0, 0x4342; shl.b32 s1, s1, 7;
shl.b32 c, $4, NIB;
prmt.b32 t, c, 0, 0x9180; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 d, d, s0, z; shl.b32 $0, d, 16; and.b32 $1, d, 0xFFFF0000;
prmt.b32 t, c, 0, 0xB3A2; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 d, d, s1, z; shl.b32 $2, d, 16; and.b32 $3, d, 0xFFFF0000;
}"""


def _decode_ptx_f32(codes, scales):
    """codes uint8 [R, N] and each code byte's own scale byte, uint8 [R, N] -> (even, odd)
    float32 [R, N] via `_PTX_DECODE_F32` (the GEMV's form: the scales loaded in the codes'
    layout and converted inside the assembly)."""
    return _asm_halves(_PTX_DECODE_F32, [codes, scales], jnp.float32, "=r,=r,=r,=r,r,r")


def _decode_alu_f32(codes, scales):
    c, s = codes.astype(jnp.int32), packed.ue8m0_to_float32(scales.astype(jnp.int32))
    return packed.e2m1_to_float32(c & 0xF) * s, packed.e2m1_to_float32(c >> 4) * s


F32_DECODERS = {"alu": _decode_alu_f32, "ptx": _decode_ptx_f32}  # (codes, per-code scales) -> float32 halves


# The per-input decode (`fp4_dequant.dequantize_k_major`): a purely elementwise decode of the
# [block_n, block_k] bf16 output tile itself, so the kernel stores it as it is (no interleave of
# two halves in Triton, whose join + reshape of the bf16 halves ordered them wrongly on an H200,
# and no wider words bitcast to bf16 outside, which XLA's GPU pipeline expands into a copy of the
# whole output: BitcastDtypesExpander). Input j of the tile gets its code byte (each byte twice:
# inputs 2r and 2r + 1), its scale byte and a select byte, 0xFF where j is odd (the high nibble)
# and 0 where even (the low nibble). Four inputs per instance: codes in $2, scale bytes in $3 (made
# bf16x2 2**(s - 127) as in `_PTX_DECODE_F32`), select bytes in $4; one lop3 puts each input's own
# nibble at its byte's top (the byte itself where odd, the byte << 4 where even: (a & c) | (b & ~c),
# table 0xE4), then `_PTX_DECODE`'s arithmetic, out $0/$1 bf16x2.
_PTX_DECODE_SELECT = """{
.reg .b32 c, t, d, k, z, s0, s1;
mov.b32 k, 0x7E807E80;
mov.b32 z, 0x80008000;
prmt.b32 s0, $3, 0, 0x4140; shl.b32 s0, s0, 7; prmt.b32 s1, $3, 0, 0x4342; shl.b32 s1, s1, 7;
shl.b32 t, $2, 4;
lop3.b32 c, $2, t, $4, 0xE4;
prmt.b32 t, c, 0, 0x9180; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 $0, d, s0, z;
prmt.b32 t, c, 0, 0xB3A2; shl.b32 t, t, 2; and.b32 d, t, 0x81C081C0;
fma.rn.bf16x2 d, d, k, z; fma.rn.bf16x2 $1, d, s1, z;
}"""


def _decode_ptx_select(codes, scales, odd):
    """codes, scale bytes and select bytes (0xFF: the high nibble), uint8 [R, C] each -> bf16 [R, C]:
    each element's own nibble decoded (`_PTX_DECODE_SELECT`)."""
    return plt.elementwise_inline_asm(_PTX_DECODE_SELECT, args=[codes, scales, odd], constraints="=r,=r,r,r,r", pack=4,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)])[0]


def _decode_alu_select(codes, scales, odd):
    c = codes.astype(jnp.int32)
    nibble = jnp.where(odd != 0, c >> 4, c & 0xF)
    return (packed.e2m1_to_float32(nibble) * packed.ue8m0_to_float32(scales.astype(jnp.int32))).astype(jnp.bfloat16)


# (codes, per-input scales, select bytes) -> bf16, one value per input
SELECT_DECODERS = {"alu": _decode_alu_select, "ptx": _decode_ptx_select}


def by_decoder(body, decode: str | None, interpret: bool):
    """body(decoder name) under the decoder choice: `decode` "alu", "ptx" (CUDA only), or None:
    `ptx` where the program runs on CUDA, `alu` elsewhere and in interpret mode (one branch per
    platform, chosen when the program is lowered, export to rocm included)."""
    if decode is None and not interpret:
        return jax.lax.platform_dependent(cuda=lambda: body("ptx"), default=lambda: body("alu"))
    decode = decode or "alu"
    if decode not in DECODERS or (interpret and decode == "ptx"):
        raise ValueError(f"decode {decode!r}: choose from {sorted(DECODERS)} (ptx needs a CUDA GPU)")
    return body(decode)


def _kernel(group_ref, tile_ref, count_ref, starts_ref, ends_ref, *refs, cfg: TileConfig, k_steps: int,
            half_k: int, num_groups: int, decode: str, gather: bool, epilogue, k_major: bool = False,
            one_mul: bool = False):
    ids_ref, e_ref, (x_ref, c_ref, s_ref, o_ref) = split_refs(refs, gather, epilogue is not None)
    bkh = cfg.block_k // 2  # code rows (bytes) per K step
    bks = cfg.block_k // packed.FP4_BLOCK  # scale rows per K step
    if cfg.gemv:
        accumulate = _gemv_accumulate(x_ref, ids_ref, c_ref, s_ref, cfg, k_steps, half_k, decode)
        work_item(group_ref, tile_ref, count_ref, starts_ref, ends_ref, o_ref, cfg, num_groups, accumulate,
                  e_ref, epilogue)
        return
    if cfg.swap_ab:  # out^T [block_n, block_m] += W^T [block_n, bkh] . A^T [bkh, block_m]
        acc_shape = (cfg.block_n, cfg.block_m)

        def product(a, w):
            return plt.dot(w.astype(a.dtype), a, trans_a=True, trans_b=True)
    else:  # out [block_m, block_n] += A [block_m, bkh] . W [bkh, block_n]
        acc_shape = (cfg.block_m, cfg.block_n)

        def product(a, w):
            return plt.dot(a, w.astype(a.dtype))

    def accumulate(g, rows, cols, mine):
        load = a_tiles(x_ref, ids_ref, rows, mine)

        def step(kk, acc):
            kb = pl.ds(pl.multiple_of(kk * bkh, bkh), bkh)
            ko = pl.ds(pl.multiple_of(half_k + kk * bkh, bkh), bkh)
            ks = pl.ds(pl.multiple_of(kk * bks, bks), bks)
            codes = c_ref[g, cols, kb].T if k_major else c_ref[g, kb, cols]
            even, odd = (ONE_MUL_DECODERS if one_mul else DECODERS)[decode](codes, s_ref[g, ks, cols])
            a_even, a_odd = load(kb), load(ko)
            acc = acc + product(a_even, even)
            return acc + product(a_odd, odd)

        acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros(acc_shape, jnp.float32))
        if one_mul:
            acc = acc * jnp.float32(2.0 ** ONE_MUL_SHIFT)
        return acc.T if cfg.swap_ab else acc

    work_item(group_ref, tile_ref, count_ref, starts_ref, ends_ref, o_ref, cfg, num_groups, accumulate,
              e_ref, epilogue)


def gemv_rows(block_k: int, block_n: int, num_warps: int) -> int:
    """The code rows of the GEMV's weight sub-tiles: those of a [rows, block_n] uint8 tile that
    Triton's coalesced layout (16 bytes per thread along N, the warp's other threads and then the
    warps along K) gives one row per thread, at least one scale group (16 code rows = 32 inputs)
    and at most the step's block_k/2 rows. Only speed depends on this matching the layout."""
    threads_n = max(1, min(32, block_n // 16))
    warps_n = max(1, min(num_warps, block_n // (16 * 32)))
    rows = max(packed.FP4_BLOCK // 2, (32 // threads_n) * (num_warps // warps_n))
    half = block_k // 2
    return rows if half % rows == 0 else packed.FP4_BLOCK // 2


def _gemv_accumulate(x_ref, ids_ref, c_ref, s_ref, cfg: TileConfig, k_steps: int, half_k: int, decode: str):
    """The GEMV variant's accumulate(g, rows, cols, mine) -> float32 [block_m, block_n]: no MMA.

    Each K step reads its [block_k/2, block_n] code bytes as sub-tiles of `gemv_rows` rows (one
    row per thread in Triton's load layout, whole scale groups), decodes each where its load left
    it, and row r of the work item adds x[r, k] * w[k, :] to its own float32 [rows, block_n]
    partial sums: one FMA per weight and row within each thread, no data exchanged between
    threads. The partial sums are added over their rows once per work item, and the rows
    assembled into the [block_m, block_n] tile then. With num_stages >= 2 the next step's bytes
    are loaded before this step's decode (carried in registers: one step of prefetch; offline
    compiles show it costs ~40% more instructions per step, repacking the carried bytes)."""
    bm, bn = cfg.block_m, cfg.block_n
    bkh = cfg.block_k // 2
    sub = gemv_rows(cfg.block_k, bn, cfg.num_warps)
    prefetch = cfg.num_stages >= 2
    k_sub = jnp.arange(sub, dtype=jnp.int32)[:, None]  # [sub, 1]: x's columns of a sub-tile
    row_iota = jnp.arange(bm, dtype=jnp.int32)

    def pick(v, r):  # element r of a [block_m] vector, as a scalar (no slicing of values in Triton)
        return jnp.sum(jnp.where(row_iota == r, v, 0))

    def accumulate(g, rows, cols, mine):
        cols_s = (cols.start + jnp.arange(bn, dtype=jnp.int32))[None, :]
        valid = mine[:, 0].astype(jnp.int32)
        src = rows.start + row_iota if ids_ref is None else plt.load(ids_ref.at[rows], mask=mine[:, 0], other=0)
        # per row: x's row (the gathered id or itself) and its mask, broadcast to the [sub, 1] loads
        x_rows = [jnp.full((sub, 1), pick(src, r), jnp.int32) for r in range(bm)]
        masks = [jnp.full((sub, 1), pick(valid, r) > 0) for r in range(bm)]

        def weights(kk):  # the step's packed bytes: (codes, their scales) of each sub-tile (kk traced, or 0)
            aligned = (lambda v, m: v) if isinstance(kk, int) else pl.multiple_of
            out = []
            for j in range(bkh // sub):
                row0 = aligned(kk * bkh + j * sub, sub)
                # each code byte's scale byte, loaded as a [sub, block_n] tile like the codes (the same
                # Triton layout: no shared-memory exchange to broadcast a scale row over 16 code rows)
                s_rows = (row0 + k_sub) // (packed.FP4_BLOCK // 2)
                out.append((c_ref[g, pl.ds(row0, sub), cols], plt.load(s_ref.at[g, s_rows, cols_s])))
            return tuple(out)

        def step(kk, carry):
            accs, packed_w = carry
            if prefetch:  # issue the next step's loads before this step's decode and FMAs
                packed_w, this = weights(jnp.minimum(kk + 1, k_steps - 1)), packed_w
            else:
                this = weights(kk)
            out = list(accs)
            for j, (codes, scales) in enumerate(this):
                for k0, w in zip((0, half_k), F32_DECODERS[decode](codes, scales)):
                    cols_x = k0 + kk * bkh + j * sub + k_sub
                    for r in range(bm):
                        a = plt.load(x_ref.at[x_rows[r], cols_x], mask=masks[r], other=0.0)
                        out[r] = out[r] + a.astype(jnp.float32) * w
            return tuple(out), packed_w

        zeros = tuple(jnp.zeros((sub, bn), jnp.float32) for _ in range(bm))
        first = weights(0) if prefetch else ((jnp.zeros((), jnp.uint8),) * 2,)
        accs, _ = jax.lax.fori_loop(0, k_steps, step, (zeros, first))
        tile = jnp.zeros((bm, bn), jnp.float32)
        for r, acc in enumerate(accs):
            tile = tile + jnp.where(row_iota[:, None] == r, jnp.sum(acc, axis=0)[None, :], 0.0)
        return tile

    return accumulate


def grouped_gemm_ranges(rows, weights: packed.Fp4Weights | packed.Fp4WeightsKMajor, starts, ends,
                        cfg: TileConfig | None = None, interpret: bool = False, zero_from=None,
                        decode: str | None = None, row_ids=None, epilogue=None, one_multiply: bool = False):
    """out[r] = rows[r] @ dequant(weights[g]) for r in [starts[g], ends[g]); rows [zero_from, M)
    zero when zero_from is given; other rows unspecified. rows bf16 [M, K], or [R, K] with
    row_ids [M] (then rows[row_ids[r]] instead of rows[r]); `epilogue` (fn, other [M, N]):
    fn(other[r] as float32, the float32 product) is stored. `decode`: "alu", "ptx" (CUDA only),
    or None: `ptx` where the program runs on CUDA, `alu` elsewhere and in interpret mode.
    `one_multiply`: the one-multiply decoders (MMA tiles only; exact where `one_multiply_fits`)."""
    return by_decoder(lambda d: _ranges(rows, weights, starts, ends, cfg, interpret, zero_from, d, row_ids, epilogue,
                                        one_multiply), decode, interpret)


def _ranges(rows, weights: packed.Fp4Weights, starts, ends, cfg, interpret, zero_from, decode: str, row_ids,
            epilogue, one_multiply: bool = False):
    m, k = num_rows(rows, row_ids), rows.shape[1]
    g, k2, n = weights.shape
    if k != k2:
        raise ValueError(f"rows have K={k}, weights K={k2}")
    k_major = isinstance(weights, packed.Fp4WeightsKMajor)
    packed.fp4_check((g, k2 // 2, n), weights.scales.shape)
    cfg = cfg or PREFILL_TILES
    if (k_major or one_multiply) and cfg.gemv:
        raise ValueError("K-major codes (packed.Fp4WeightsKMajor) and one_multiply run on the MMA tiles only, "
                         "not gemv")
    if cfg.half_tail:
        raise ValueError("half_tail is a bf16-kernel option (pallas_grouped_gemm); the W4A16 kernel's products are "
                         "block_m rows")
    if cfg.gemv and (cfg.swap_ab or cfg.block_m > GEMV_MAX_BLOCK_M):
        raise ValueError(f"gemv tiles take block_m <= {GEMV_MAX_BLOCK_M} rows (larger groups run as several "
                         f"items) and no swap_ab; got block_m={cfg.block_m}, swap_ab={cfg.swap_ab}")
    bk = min(cfg.block_k, k)
    bn = min(cfg.block_n, n)
    if bk % packed.FP4_BLOCK or k % bk or n % bn:
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={bk} (itself a multiple of "
                         f"{packed.FP4_BLOCK}) and block_n={bn}")
    cfg = dataclasses.replace(cfg, block_k=bk, block_n=bn)
    starts, ends = with_zero_range(starts, ends, zero_from, m)
    pad = cfg.block_m if interpret else 0
    a_operands = padded_a(packed.split_even_odd(rows), row_ids, pad)
    fn, e_operands = epilogue_operands(epilogue, (m, n), pad)
    items = -(-m // cfg.block_m) + starts.shape[0]
    group, tile, count = work_items(starts, ends, cfg.block_m, items)
    call = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, k_steps=k // bk, half_k=k // 2, num_groups=g, decode=decode,
                          gather=row_ids is not None, epilogue=fn, k_major=k_major, one_mul=one_multiply),
        out_shape=jax.ShapeDtypeStruct((m + pad, n), rows.dtype),
        grid=(n // bn, items),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=kernel_name(cfg),
    )
    out = call(group, tile, count, starts, ends, *a_operands, weights.codes, weights.scales, *e_operands)
    return out[:m] if pad else out


def kernel_name(cfg: TileConfig) -> str:
    """The pallas_call's name (seen in traces and lowered modules) of a variant."""
    return "w4a16_grouped_gemm" + ("_gemv" if cfg.gemv else "_swap" if cfg.swap_ab else "")


def grouped_gemm(rows, weights: packed.Fp4Weights | packed.Fp4WeightsKMajor, group_sizes,
                 cfg: TileConfig | None = None, interpret: bool = False, decode: str | None = None, row_ids=None,
                 zero_tail: bool = True, epilogue=None, one_multiply: bool = False):
    """The seam's contract: contiguous groups by size; rows past the last group are zero
    (unwritten with zero_tail=False). `row_ids` [M]: the product's rows are rows[row_ids]
    (gathered in the kernel). `epilogue` (fn, other [M, N]): fn(other, product) is stored.
    `one_multiply`: see `grouped_gemm_ranges`."""
    if cfg is None:
        cfg = default_tiles(num_rows(rows, row_ids) / max(weights.shape[0], 1),
                            isinstance(weights, packed.Fp4WeightsKMajor))
    ranges = functools.partial(grouped_gemm_ranges, decode=decode, one_multiply=one_multiply)
    return from_group_sizes(ranges, rows, weights, group_sizes, cfg, interpret, row_ids=row_ids,
                            zero_tail=zero_tail, epilogue=epilogue)
