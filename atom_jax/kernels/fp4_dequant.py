"""Packed FP4 experts (`packed.Fp4Weights`) decoded to a dense bf16 [E, K, N] array by a streaming
Pallas kernel (Triton lowering; interpret mode on CPU): for prefill, where the W4A16 kernel
decodes the same weights again in every row tile, decode once and run the bf16 kernel.

Each program reads one [block_k/2, block_n] tile of code bytes and its [block_k/32, block_n]
ue8m0 scales and writes the [block_k, block_n] bf16 values: 0.53 bytes read and 2 written per
weight, nothing else, so it should run near the copy bandwidth. The decode is the W4A16
kernel's (`w4a16_grouped_gemm.DECODERS`: `ptx` on CUDA, `alu` elsewhere, chosen per platform
the same way), which yields the even inputs (low nibbles) and the odd inputs (high nibbles) as
two tiles. The output is allocated as [E, K/2, 2, N] (the same bytes as [E, K, N]: input 2r is
[r, 0], input 2r + 1 is [r, 1]), so the two halves are two plain stores of whole rows (stride
2N) and no in-register interleave is needed; the final reshape is free.

K-major codes (`packed.Fp4WeightsKMajor`, [E, N, K/2]) decode either to the same [E, K, N]
(`dequantize`: each code tile transposed in the kernel, through shared memory) or, without any
transpose, to [E, N, K] (`dequantize_k_major`): each program reads a [block_n, block_k/2] code
tile (rows contiguous along K, 4 code bytes per thread: `load_in_runs`) and its small
[block_k/32, block_n] scale tile, spreads both to the [block_n, block_k] output tile (each code
byte twice, for inputs 2r and 2r + 1, by a broadcast + reshape in Triton, or with
`DequantTiles.gather_codes` read twice from memory; each scale byte 32 times) with a select byte
per column (0xFF where odd: the high nibble), and decodes that tile purely elementwise
(`w4a16_grouped_gemm.SELECT_DECODERS`: on CUDA one inline assembly per 4 inputs, `_PTX_DECODE`'s
arithmetic after one lop3 that puts each input's own nibble at its byte's top; the ALU decoder
elsewhere), so the bf16 tile is stored as it is, 16 bytes per thread. No interleave anywhere: an
in-register interleave of the two decoded halves (Triton's join + reshape) ordered them [e0, e1,
o0, o1] on an H200 (wrong); two strided stores into an [N, K/2, 2] view were right but slow (the
V4-Flash up projection's experts in 2.72 ms against 0.79 for the wrong one); one 32-bit word per
code byte bitcast to bf16 outside the kernel costs a copy of the output (XLA's GPU pipeline
expands a bitcast between widths into arithmetic: BitcastDtypesExpander). Offline sm_90a compile
(pip Triton 3.9 on the TTIR, 512x64 tiles, 4 warps; indicative only): 32 16-byte stores, 1
barrier, 144 registers, no spills, ~5.3 SASS instructions per weight, where the strided stores
took 256 2-byte stores, 65 barriers and 255 registers with stack (the other tiles of `bench w4a16
--prefill-sweep`: 16-byte stores, at most 1 barrier, no spills; gathered codes: 256 byte loads
per thread instead of 32 4-byte ones, ~7.4 instructions per weight, 164 registers). The bf16
Pallas kernel multiplies that layout with `transpose_b`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from atom_jax.kernels import packed
from atom_jax.kernels.w4a16_grouped_gemm import DECODERS, SELECT_DECODERS, by_decoder


@dataclasses.dataclass(frozen=True)
class DequantTiles:
    """One program's tile: block_k inputs (a multiple of 32: whole scale groups; block_k/2 code
    rows) x block_n columns. Powers of two (Triton). Not yet tuned on a GPU:
    `python -m atom_jax.bench w4a16 --dequant-sweep` times others."""

    block_k: int = 64
    block_n: int = 512
    num_warps: int = 4
    num_stages: int = 1
    # `dequantize_k_major` only: load each code byte twice straight from memory (column c reads
    # byte c // 2: byte loads, no reshape) instead of 4 bytes per thread spread by a broadcast +
    # reshape in Triton (whose join + reshape misordered values on an H200 once): `bench w4a16
    # --prefill-sweep` times both, the GPU test checks both.
    gather_codes: bool = False


DEFAULT_TILES = DequantTiles()
# `dequantize_k_major`'s: code rows of block_k/2 = 256 bytes (two 128-byte lines), bf16 rows of
# 1 KiB. Not yet tuned on a GPU: `python -m atom_jax.bench w4a16 --dequant-sweep` times others.
KMAJOR_TILES = DequantTiles(block_k=512, block_n=64)


def load_in_runs(ref, run: int):
    """The whole 2-D block `ref`, read through column indices written (c // run) * run + c % run
    (= c): Triton then knows runs of `run` contiguous elements only and gives each thread `run`
    of them per load (a warp's loads still contiguous), instead of 16 bytes. The decode kernels
    read `run` code bytes per thread so that their bf16 values are exactly one 16-byte store per
    thread in the layout Triton picks for the output: otherwise each thread's 16 code bytes
    decode to 32-64 output bytes, which Triton moves through shared memory into the store's
    layout (offline sm_90a compile of these kernels' TTIR: 33-65 barriers per program, 1 with
    this; 80 registers instead of 128)."""
    rows, cols = ref.shape
    c = jnp.arange(cols, dtype=jnp.int32)
    c = jax.lax.div(c, run) * run + jax.lax.rem(c, run)
    return plt.load(ref.at[jnp.arange(rows, dtype=jnp.int32)[:, None], c[None, :]])


def _kernel(c_ref, s_ref, o_ref, *, decode: str, k_major: bool):
    # K-major: the [block_n, block_k/2] tile transposed; else 8 code bytes per thread, whose even
    # and odd values are one 16-byte store each (see `load_in_runs`)
    codes = c_ref[...].T if k_major else load_in_runs(c_ref, 8)
    even, odd = DECODERS[decode](codes, s_ref[...])
    o_ref[:, 0, :] = even
    o_ref[:, 1, :] = odd


def dequantize(weights: packed.Fp4Weights | packed.Fp4WeightsKMajor, tiles: DequantTiles | None = None, interpret: bool = False,
               decode: str | None = None) -> jax.Array:
    """Fp4Weights [E, K/2, N] codes (or `Fp4WeightsKMajor`'s [E, N, K/2]) + [E, K/32, N] scales ->
    bf16 [E, K, N], the exact values of `packed.fp4_dequantize`. `decode`: "alu", "ptx" (CUDA only), or None: `ptx` where the program
    runs on CUDA, `alu` elsewhere and in interpret mode."""
    return by_decoder(lambda d: _dequantize(weights, tiles, interpret, d), decode, interpret)


def _dequantize(weights, tiles: DequantTiles | None, interpret: bool, decode: str):
    if weights.ndim != 3:
        raise ValueError(f"expected an expert stack [E, K/2, N], got codes {weights.codes.shape}")
    e, k, n = weights.shape
    k_major = isinstance(weights, packed.Fp4WeightsKMajor)
    packed.fp4_check((e, k // 2, n), weights.scales.shape)
    tiles = tiles or DEFAULT_TILES
    bk, bn = block_sizes(k, n, tiles)
    bkh, bks = bk // 2, bk // packed.FP4_BLOCK
    out = pl.pallas_call(
        functools.partial(_kernel, decode=decode, k_major=k_major),
        out_shape=jax.ShapeDtypeStruct((e, k // 2, 2, n), jnp.bfloat16),
        grid=(e, k // bk, n // bn),
        in_specs=[pl.BlockSpec((None, bn, bkh), lambda g, i, j: (g, j, i)) if k_major else
                  pl.BlockSpec((None, bkh, bn), lambda g, i, j: (g, i, j)),
                  pl.BlockSpec((None, bks, bn), lambda g, i, j: (g, i, j))],
        out_specs=pl.BlockSpec((None, bkh, 2, bn), lambda g, i, j: (g, i, 0, j)),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="fp4_dequant",
    )(weights.codes, weights.scales)
    return out.reshape(e, k, n)


def _kernel_k_major(c_ref, s_ref, o_ref, *, decode: str, gather_codes: bool):
    bn, bkh = c_ref.shape
    bk = 2 * bkh
    # each code byte twice (inputs 2r and 2r + 1): gathered, or the [block_n, block_k/2] tile read 4
    # code bytes per thread (`load_in_runs`; read plainly: 65 barriers per program offline, 1 with
    # it) and spread
    if gather_codes:
        codes = plt.load(c_ref.at[jnp.arange(bn, dtype=jnp.int32)[:, None],
                                  jax.lax.div(jnp.arange(bk, dtype=jnp.int32), 2)[None, :]])
    else:
        codes = load_in_runs(c_ref, 4)
        codes = jnp.broadcast_to(codes[:, :, None], (bn, bkh, 2)).reshape(bn, bk)
    scales = s_ref[...].T  # [block_n, block_k/32]: 1/32 of the output tile
    scales = jnp.broadcast_to(scales[:, :, None], (bn, scales.shape[1], packed.FP4_BLOCK)).reshape(bn, bk)
    odd = jnp.broadcast_to(((jnp.arange(bk, dtype=jnp.int32) & 1) * 0xFF).astype(jnp.uint8)[None, :], (bn, bk))
    # one value per input, elementwise: the output tile stored as it is, no interleave
    o_ref[...] = SELECT_DECODERS[decode](codes, scales, odd)


def dequantize_k_major(weights: packed.Fp4WeightsKMajor, tiles: DequantTiles | None = None, interpret: bool = False,
                       decode: str | None = None) -> jax.Array:
    """Fp4WeightsKMajor ([E, N, K/2] codes, [E, K/32, N] scales) -> bf16 [E, N, K] (the dense
    experts with their last two axes swapped: out[e, n, k] = `packed.fp4_dequantize(weights)[e,
    k, n]`), without transposing the codes. `decode` as `dequantize`'s."""
    if not isinstance(weights, packed.Fp4WeightsKMajor) or weights.ndim != 3:
        raise ValueError("dequantize_k_major takes an expert stack of K-major codes (packed.Fp4WeightsKMajor [E, N, K/2])")
    return by_decoder(lambda d: _dequantize_k_major(weights, tiles or KMAJOR_TILES, interpret, d), decode, interpret)


def _dequantize_k_major(weights, tiles: DequantTiles, interpret: bool, decode: str):
    e, k, n = weights.shape
    packed.fp4_check((e, k // 2, n), weights.scales.shape)
    bk, bn = k_major_block_sizes(k, n, tiles)
    bkh, bks = bk // 2, bk // packed.FP4_BLOCK
    out = pl.pallas_call(
        functools.partial(_kernel_k_major, decode=decode, gather_codes=tiles.gather_codes),
        out_shape=jax.ShapeDtypeStruct((e, n, k), jnp.bfloat16),
        grid=(e, n // bn, k // bk),  # along K fastest: consecutive programs write consecutive rows
        in_specs=[pl.BlockSpec((None, bn, bkh), lambda g, j, i: (g, j, i)),
                  pl.BlockSpec((None, bks, bn), lambda g, j, i: (g, i, j))],
        out_specs=pl.BlockSpec((None, bn, bk), lambda g, j, i: (g, j, i)),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="fp4_dequant_kmajor",
    )(weights.codes, weights.scales)
    return out


def block_sizes(k: int, n: int, tiles: DequantTiles | None = None) -> tuple[int, int]:
    """(block_k, block_n) of the decode of [E, K, N] experts: the tiles' sizes, capped at K and N,
    which must divide K and N and be powers of two (Triton's blocks; block_k a multiple of the
    scale group). ValueError otherwise."""
    tiles = tiles or DEFAULT_TILES
    bk, bn = min(tiles.block_k, k), min(tiles.block_n, n)
    if bk % packed.FP4_BLOCK or k % bk or n % bn or bk & (bk - 1) or bn & (bn - 1):
        raise ValueError(f"K={k} and N={n} must be multiples of block_k={bk} (itself a multiple of "
                         f"{packed.FP4_BLOCK}) and block_n={bn}, both powers of two")
    return bk, bn


def k_major_block_sizes(k: int, n: int, tiles: DequantTiles | None = None) -> tuple[int, int]:
    """`block_sizes` of `dequantize_k_major` (default KMAJOR_TILES): block_k halved from the
    tiles' until it divides K, down to one scale group (V4-Pro's 3072 intermediate split 8 ways
    is K = 384 in the down projection: 128)."""
    tiles = tiles or KMAJOR_TILES
    bk = tiles.block_k
    while bk > packed.FP4_BLOCK and k % bk:
        bk //= 2
    return block_sizes(k, n, dataclasses.replace(tiles, block_k=bk))


def bytes_moved(shape) -> float:
    """Bytes a decode of experts `shape` [E, K, N] must move: codes + scales read, bf16 written."""
    e, k, n = shape
    return e * k * n * (0.5 + 1 / packed.FP4_BLOCK + 2)
