"""FP8 block-scaled dense GEMM in Pallas for the Triton backend: y = x @ W^T with x bf16 [M, K]
and W e4m3fn [N, K] (uint8 codes, the checkpoint's [out, in]) with one float32 scale per 128x128
block. Each program owns a [block_m, 128] output tile; each K step loads a [128, 128] code tile
(one scale block), converts it to bf16 (exact: e4m3 values fit bf16), multiplies, and applies the
block's scale to the float32 partial product, so the weight streams at 1 byte per value.

Why a kernel beside `packed.fp8_linear` (decode the whole weight per block in jnp, then one
matmul): that path writes and re-reads the bf16 weight every call, 5 bytes per weight against 2
for a bf16 model, which is what decode steps pay for; here a weight is read once per row tile.
Prefill-sized M re-decodes each tile per row tile instead; `fp8_linear` picks the kernel below
`KERNEL_MAX_ROWS` on GPU (bench: `python -m atom_jax.bench fp8`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK = 128  # scale block edge = the kernel's N and K tile


def _kernel(x_ref, c_ref, s_ref, o_ref, *, m: int, block_m: int, k_steps: int):
    j = pl.program_id(0)  # column tile (= scale row): fastest, so a row tile stays in L2
    i = pl.program_id(1)
    rows = pl.ds(i * block_m, block_m)
    cols = pl.ds(j * BLOCK, BLOCK)
    mine = (i * block_m + jnp.arange(block_m, dtype=jnp.int32) < m)[:, None]

    def step(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * BLOCK, BLOCK), BLOCK)
        a = plt.load(x_ref.at[rows, ks], mask=mine, other=0.0)
        w = jax.lax.bitcast_convert_type(c_ref[cols, ks], jnp.float8_e4m3fn).astype(a.dtype)
        part = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + part * s_ref[j, kk]

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((block_m, BLOCK), jnp.float32))
    plt.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mine)


def supported(k: int, n: int) -> bool:
    """The kernel needs whole 128x128 blocks."""
    return k % BLOCK == 0 and n % BLOCK == 0


def fp8_matmul(x, codes, scale, block_m: int = 64, num_warps: int = 4, num_stages: int = 3,
               interpret: bool = False):
    """x [M, K] @ dequant(codes [N, K], scale [N/128, K/128])^T -> [M, N] in x.dtype."""
    m, k = x.shape
    n, k2 = codes.shape
    if k != k2 or not supported(k, n) or scale.shape != (n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8_matmul: x {x.shape}, codes {codes.shape}, scale {scale.shape}: need "
                         f"K and N multiples of {BLOCK} and one scale per 128x128 block")
    block_m = min(block_m, max(16, pl.next_power_of_2(m)))
    tiles = pl.cdiv(m, block_m)
    pad = tiles * block_m - m if interpret else 0  # interpret mode clamps slices instead of masking
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    out = pl.pallas_call(
        functools.partial(_kernel, m=m, block_m=block_m, k_steps=k // BLOCK),
        out_shape=jax.ShapeDtypeStruct((m + pad, n), x.dtype),
        grid=(n // BLOCK, tiles),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_dense_gemm",
    )(xp, codes, scale.astype(jnp.float32))
    return out[:m] if pad else out
