"""Weights kept in DeepSeek's packed formats on the device, and their jnp decoders (the CPU path
and the kernels' oracle). Everything is stored as uint8 bytes (orbax and every backend handle
those), decoded with integer ops and a bitcast (exact, no lookup table):

* `Fp4Weights` (routed experts, W4A16): codes [..., K/2, N] uint8, byte r of column n holds input
  2r in its low nibble and input 2r + 1 in its high nibble (e2m1: sign bit 3, exponent bits 1-2,
  mantissa bit 0); scales [..., K/32, N] uint8 ue8m0 (2**(s - 127)), one per 32 inputs. This is
  the checkpoint's [out, in/2] tensor transposed to our [in, out] convention, bytes unchanged.
* FP8 dense weights: e4m3fn codes kept in the checkpoint's [out, in] orientation as uint8, with
  float32 scales [ceil(out/128), ceil(in/128)] (V4's ue8m0 and V3's float32 scales alike).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from atom_jax.kernels.platform import is_cpu

FP4_BLOCK = 32  # inputs per FP4 scale
FP8_BLOCK = 128  # FP8 block edge


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp4Weights:
    """A stack of FP4 matrices [..., K, N] (see the module docstring for the byte layout)."""

    codes: jax.Array  # uint8 [..., K/2, N]
    scales: jax.Array  # uint8 [..., K/32, N]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-2], 2 * self.codes.shape[-2], self.codes.shape[-1])

    @property
    def ndim(self) -> int:
        return self.codes.ndim



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp4WeightsKMajor:
    """`Fp4Weights` with the codes stored K-major, [..., N, K/2] (the checkpoint's own [out, in/2]
    orientation: each column's bytes contiguous along K); scales as `Fp4Weights`' [..., K/32, N].
    The W4A16 MMA kernel reads these with one 32-bit shared-memory load per four code bytes of a
    column, where the [K/2, N] layout costs four byte loads and their repacking (`to_k_major`)."""

    codes: jax.Array  # uint8 [..., N, K/2]
    scales: jax.Array  # uint8 [..., K/32, N]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-2], 2 * self.codes.shape[-1], self.codes.shape[-2])

    @property
    def ndim(self) -> int:
        return self.codes.ndim


def to_k_major(w: Fp4Weights) -> Fp4WeightsKMajor:
    """The same weights with K-major codes (one transpose of the codes: do it once, at load)."""
    return Fp4WeightsKMajor(jnp.swapaxes(w.codes, -1, -2), w.scales)


def from_k_major(w: Fp4WeightsKMajor) -> Fp4Weights:
    return Fp4Weights(jnp.swapaxes(w.codes, -1, -2), w.scales)


FP4_TYPES = (Fp4Weights, Fp4WeightsKMajor)  # packed FP4 experts, either code layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKMajor:
    """Dense experts [..., K, N] stored with their last two axes swapped, `w` [..., N, K]: what
    the decode kernel makes of K-major FP4 codes without a transpose
    (`fp4_dequant.dequantize_k_major`); the grouped-GEMM seam's Pallas backend multiplies it as
    it is (`transpose_b`), the other backends take `dense()`."""

    w: jax.Array  # [..., N, K]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.w.shape[:-2], self.w.shape[-1], self.w.shape[-2])

    @property
    def ndim(self) -> int:
        return self.w.ndim

    @property
    def dtype(self):
        return self.w.dtype

    def dense(self) -> jax.Array:
        """The [..., K, N] array (an XLA transpose)."""
        return jnp.swapaxes(self.w, -1, -2)


def fp4_weights(codes, scales, k_major: bool) -> Fp4Weights | Fp4WeightsKMajor:
    """The packed operand of stored codes and scales: codes [..., N, K/2] when `k_major`, else
    [..., K/2, N]."""
    return (Fp4WeightsKMajor if k_major else Fp4Weights)(codes, scales)


def fp4_check(codes_shape, scales_shape):
    *lead, kh, n = codes_shape
    k = 2 * kh
    want = (*lead, -(-k // FP4_BLOCK), n)
    if tuple(scales_shape) != want:
        raise ValueError(f"FP4 scales {tuple(scales_shape)} do not fit codes {tuple(codes_shape)} (want {want})")


def e2m1_to_float32(nibble):
    """int32 4-bit e2m1 codes -> float32 values (exact): bits built directly, then bitcast."""
    sign = (nibble >> 3) & 1
    e = (nibble >> 1) & 3
    m = nibble & 1
    normal = (sign << 31) | ((e + 126) << 23) | (m << 22)  # (1 + m/2) * 2**(e - 1)
    sub = (sign << 31) | ((m * 126) << 23)  # e == 0: 0.5 * m
    return jax.lax.bitcast_convert_type(jnp.where(e == 0, sub, normal), jnp.float32)


def ue8m0_to_float32(s):
    """int32 e8m0 exponents -> 2**(s - 127) as float32 (s = 0 gives 0, not 2**-127)."""
    return jax.lax.bitcast_convert_type(s << 23, jnp.float32)


def expand_rows(a, factor: int):
    """[R, N] -> [R * factor, N], each row repeated `factor` times (broadcast + reshape: lowers
    inside Triton kernels too)."""
    r, n = a.shape
    return jnp.broadcast_to(a[:, None, :], (r, factor, n)).reshape(r * factor, n)


def fp4_decode_halves(codes, scales):
    """codes uint8 [Kh, N], scales uint8 [Kh/16, N] -> (even-input values, odd-input values), each
    float32 [Kh, N]: the form the kernel multiplies (row r of each half is input 2r / 2r + 1)."""
    c = codes.astype(jnp.int32)
    s = expand_rows(ue8m0_to_float32(scales.astype(jnp.int32)), FP4_BLOCK // 2)
    return e2m1_to_float32(c & 0xF) * s, e2m1_to_float32(c >> 4) * s


def fp4_dequantize(w: Fp4Weights | Fp4WeightsKMajor, dtype=jnp.bfloat16):
    """Fp4Weights [..., K/2, N] (or K-major) -> dense [..., K, N] `dtype` (exact in bf16 and float32)."""
    if isinstance(w, Fp4WeightsKMajor):
        w = from_k_major(w)
    *lead, kh, n = w.codes.shape
    codes = w.codes.reshape(-1, kh, n)
    scales = w.scales.reshape(-1, w.scales.shape[-2], n)
    lo, hi = jax.vmap(fp4_decode_halves)(codes, scales)
    dense = jnp.stack([lo, hi], axis=2).reshape(*lead, 2 * kh, n)  # interleave: input 2r, 2r + 1
    return dense.astype(dtype)


def split_even_odd(x):
    """[M, K] -> [M, K] with the even columns first, then the odd ones: the activation order the
    W4A16 kernel reads (a tile's even inputs meet the low nibbles, odd inputs the high ones)."""
    return jnp.concatenate([x[:, 0::2], x[:, 1::2]], axis=1)


def fp8_dequantize(codes, scale, dtype=jnp.bfloat16):
    """e4m3fn codes [..., out, in] (uint8) times float32 128x128 block scales -> [..., out, in]."""
    *lead, out_f, in_f = codes.shape
    w = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32)
    rb, cb = scale.shape[-2], scale.shape[-1]
    if (rb, cb) != (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)):
        raise ValueError(f"FP8 block scales {scale.shape} do not fit weight {codes.shape}")
    s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
    return (w * s[..., :out_f, :in_f]).astype(dtype)


# Where `fp8_linear` runs the Pallas FP8 kernel on GPU (each weight read once per row tile)
# instead of decoding the weight in XLA and multiplying with cuBLAS / hipBLASLt. Measured with
# `python -m atom_jax.bench fp8` on 1x H200 (docs/benchmarks.md, 2026-11-30): the kernel won only
# at 64 rows and only with a short reduction (K <= 2048: wq_b 0.35-0.55x the XLA path's time,
# V4-Flash shared down 0.89x); at K >= 4096 it lost on 5 of 6 shapes at 64 rows (up to 1.95x; V4-Pro
# wo_b, K = 16384, was a tie at 0.96x), and at 256+ rows it lost on all but one of 9 shapes.
FP8_KERNEL_MAX_ROWS = 64
FP8_KERNEL_MAX_K = 2048


def fp8_linear(x, codes, scale, use_kernel: bool | None = None):
    """x [..., in] @ W^T for an FP8 weight W [out, in] with block scales -> [..., out] in x.dtype.

    Decode-sized calls on GPU run the Pallas kernel (`fp8_dense_gemm`: 1 byte per weight
    streamed); otherwise the weight is decoded per 128x128 block in jnp and multiplied in one
    matmul (the CPU path and the oracle; XLA fuses the decode into one pass)."""
    *lead, k = x.shape
    n = codes.shape[0]
    m = 1
    for d in lead:
        m *= d
    if use_kernel is None:
        from atom_jax.kernels.fp8_dense_gemm import supported
        use_kernel = not is_cpu() and supported(k, n) and m <= FP8_KERNEL_MAX_ROWS and k <= FP8_KERNEL_MAX_K
    if use_kernel:
        from atom_jax.kernels.fp8_dense_gemm import fp8_matmul
        out = fp8_matmul(x.reshape(m, k), codes, scale, interpret=is_cpu())
        return out.reshape(*lead, n)
    w = fp8_dequantize(codes, scale, x.dtype)
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def fp8_grouped_linear(x, codes, scale, groups: int, use_kernel: bool | None = None):
    """x [..., G, in] with one FP8 weight per group, stored stacked as the checkpoint does
    ([G*out, in] codes, block scales over that) -> [..., G, out]: group g multiplies rows
    [g*out, (g+1)*out). Groups aligned to the 128-row scale blocks go through `fp8_linear` per
    group (the kernel on GPU); otherwise the whole weight is decoded first."""
    rows, k = codes.shape
    out_f = rows // groups
    if out_f % FP8_BLOCK == 0:
        c = codes.reshape(groups, out_f, k)
        s = scale.reshape(groups, out_f // FP8_BLOCK, scale.shape[-1])
        one = lambda xg, cg, sg: fp8_linear(xg, cg, sg, use_kernel)  # noqa: E731
        return jax.vmap(one, in_axes=(-2, 0, 0), out_axes=-2)(x, c, s)
    w = fp8_dequantize(codes, scale, x.dtype).reshape(groups, out_f, k)
    return jnp.einsum("...gi,goi->...go", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
