"""Dequantisation of DeepSeek's checkpoint formats, and the matching quantisers for tests.

* FP8: e4m3fn weight [out, in] with one scale per 128x128 block, scale shape
  [ceil(out/128), ceil(in/128)], stored as float32 (V3 `weight_scale_inv`) or ue8m0 (V4 `.scale`).
* FP4 (routed experts): int8/uint8 [out, in/2], two e2m1 codes per byte (low nibble = even input
  column, high nibble = odd column), one ue8m0 scale per 32 inputs, scale shape [out, in/32].

Decoding goes through lookup tables (exact), a chunk of rows at a time, so peak temporary memory is
a slice of one tensor.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0  # largest finite e4m3fn
FP4_MAX = 6.0  # largest e2m1

# e2m1 magnitude by 3-bit code; bit 3 is the sign
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_E2M1 = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES]).astype(np.float32)

_ROWS_PER_CHUNK = 256  # keeps the gathered float32 chunk cache-sized


def _lut(dtype) -> np.ndarray:
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)


def _pair_lut(byte_lut: np.ndarray) -> np.ndarray:
    """[65536, 2k] table giving the values of two consecutive bytes read as one native uint16:
    one gather per two bytes is several times faster than one per byte."""
    two = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)  # native byte order
    return np.concatenate([byte_lut[two[:, 0]], byte_lut[two[:, 1]]], axis=1).astype(np.float32)


_E4M3_LUT = _lut(ml_dtypes.float8_e4m3fn)[:, None]  # [256, 1]
# value of each fp4 byte: [byte] -> (even column = low nibble, odd column = high nibble)
_FP4_LUT = np.stack([_E2M1[np.arange(256) & 0xF], _E2M1[np.arange(256) >> 4]], axis=1).astype(np.float32)
_E4M3_LUT2 = _pair_lut(_E4M3_LUT)
_FP4_LUT2 = _pair_lut(_FP4_LUT)


def _decode(codes: np.ndarray, lut: np.ndarray, lut2: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, n] -> float32 [rows, n * values-per-byte] through the lookup tables."""
    rows = codes.shape[0]
    if codes.shape[1] % 2 == 0 and codes.flags.c_contiguous:
        return np.take(lut2, codes.view(np.uint16), axis=0).reshape(rows, -1)
    return np.take(lut, codes, axis=0).reshape(rows, -1)


def _apply_block_scales(vals: np.ndarray, s: np.ndarray, block: int, out: np.ndarray):
    """out[r, j] = vals[r, j] * s[r, j // block] (s broadcastable over rows), cast into out.

    `out` is a run of whole rows of a C-contiguous array, so its reshape below is a view."""
    rows, n = vals.shape
    if n % block == 0:
        nb = n // block
        np.multiply(vals.reshape(rows, nb, block), s.reshape(-1, nb)[:, :, None], out=out.reshape(rows, nb, block))
    else:  # partial last block: spell the scales out per column
        np.multiply(vals, np.repeat(s.reshape(-1, s.shape[-1]), block, axis=1)[:, :n], out=out)


def ue8m0_to_float32(codes: np.ndarray) -> np.ndarray:
    """2**(e - 127) for each e8m0 code (0xFF is NaN)."""
    e = np.asarray(codes).view(np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.where(e == 255, 127, e) - 127).astype(np.float32)
    out[e == 255] = np.nan
    return out


def scale_to_float32(scale: np.ndarray) -> np.ndarray:
    """Scales as float32, whatever they were stored as (float8_e8m0fnu / raw uint8 e8m0 / float)."""
    scale = np.asarray(scale)
    if scale.dtype in (np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.uint8)):
        return ue8m0_to_float32(scale)
    if scale.dtype.kind != "f" and scale.dtype != np.dtype(ml_dtypes.bfloat16):
        raise ValueError(f"unsupported scale dtype {scale.dtype}")
    return scale.astype(np.float32)


def fp8_scale_shape(out_features: int, in_features: int, block: int = FP8_BLOCK) -> tuple[int, int]:
    return (-(-out_features // block), -(-in_features // block))


def fp4_scale_shape(out_features: int, in_features: int, block: int = FP4_BLOCK) -> tuple[int, int]:
    return (out_features, -(-in_features // block))


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, dtype=np.float32, block: int = FP8_BLOCK) -> np.ndarray:
    """e4m3fn weight [out, in] (or its raw bytes) times its 128x128 block scales -> [out, in] `dtype`."""
    if weight.ndim != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {weight.shape}")
    if weight.dtype not in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8)):
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    out_f, in_f = weight.shape
    if tuple(scale.shape) != fp8_scale_shape(out_f, in_f, block):
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight {weight.shape} "
                         f"(want {fp8_scale_shape(out_f, in_f, block)})")
    s = scale_to_float32(scale)
    codes = weight.view(np.uint8)
    result = np.empty((out_f, in_f), dtype)
    for bi in range(s.shape[0]):  # one band of `block` rows shares a row of scales
        rows = slice(bi * block, min((bi + 1) * block, out_f))
        _apply_block_scales(_decode(codes[rows], _E4M3_LUT, _E4M3_LUT2), s[bi], block, result[rows])
    return result


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray, dtype=np.float32, block: int = FP4_BLOCK) -> np.ndarray:
    """Packed e2m1 [out, in/2] (int8/uint8) times per-32-input ue8m0 scales -> [out, in] `dtype`."""
    if packed.ndim != 2:
        raise ValueError(f"packed FP4 weight must be 2-D, got shape {packed.shape}")
    if packed.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise ValueError(f"packed FP4 weight must be int8/uint8, got {packed.dtype}")
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    if tuple(scale.shape) != fp4_scale_shape(out_f, in_f, block):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match packed weight {packed.shape} "
                         f"(want {fp4_scale_shape(out_f, in_f, block)} for {in_f} inputs)")
    s = scale_to_float32(scale)
    codes = packed.view(np.uint8)
    result = np.empty((out_f, in_f), dtype)
    for r0 in range(0, out_f, _ROWS_PER_CHUNK):
        rows = slice(r0, min(r0 + _ROWS_PER_CHUNK, out_f))
        _apply_block_scales(_decode(codes[rows], _FP4_LUT, _FP4_LUT2), s[rows], block, result[rows])
    return result


# ---- quantisers (used to build synthetic official checkpoints) --------------------------------

def _ue8m0_encode_ceil(s: np.ndarray) -> np.ndarray:
    """Smallest power of two >= s, as e8m0 codes (so x / scale never exceeds the format's max)."""
    exp = np.ceil(np.log2(s.astype(np.float64)))
    return np.clip(exp + 127, 0, 254).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def _block_amax(w: np.ndarray, rb: int, cb: int) -> np.ndarray:
    out_f, in_f = w.shape
    pr, pc = -(-out_f // rb) * rb - out_f, -(-in_f // cb) * cb - in_f
    a = np.pad(np.abs(w.astype(np.float32)), ((0, pr), (0, pc)))
    return a.reshape(a.shape[0] // rb, rb, a.shape[1] // cb, cb).max(axis=(1, 3))


def quantize_fp8(w: np.ndarray, scale_format: str = "ue8m0", block: int = FP8_BLOCK):
    """float [out, in] -> (float8_e4m3fn [out, in], scale [ceil(out/128), ceil(in/128)]).

    scale_format "ue8m0" (V4: power-of-two scales as float8_e8m0fnu) or "float32" (V3)."""
    w = np.asarray(w, np.float32)
    amax = np.maximum(_block_amax(w, block, block), 1e-4)
    if scale_format == "ue8m0":
        scale = _ue8m0_encode_ceil(amax / FP8_MAX)
    elif scale_format == "float32":
        scale = (amax / FP8_MAX).astype(np.float32)
    else:
        raise ValueError(f"scale_format must be 'ue8m0' or 'float32', got {scale_format!r}")
    s = scale_to_float32(scale)
    full = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[: w.shape[0], : w.shape[1]]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def quantize_fp4(w: np.ndarray, block: int = FP4_BLOCK, packed_dtype=np.int8):
    """float [out, in] (in even) -> (packed [out, in/2] int8, float8_e8m0fnu scale [out, ceil(in/32)])."""
    w = np.asarray(w, np.float32)
    out_f, in_f = w.shape
    if in_f % 2:
        raise ValueError(f"FP4 packing needs an even number of inputs, got {in_f}")
    amax = np.maximum(_block_amax(w, 1, block), 1e-12)
    scale = _ue8m0_encode_ceil(amax / FP4_MAX)
    full = np.repeat(scale_to_float32(scale), block, axis=1)[:, :in_f]
    x = np.clip(w / full, -FP4_MAX, FP4_MAX)
    # nearest e2m1 magnitude (ties to the lower code), sign in bit 3
    mag = np.argmin(np.abs(np.abs(x)[..., None] - E2M1_MAGNITUDES), axis=-1).astype(np.uint8)
    codes = mag | np.where(np.signbit(x) & (mag > 0), 0x8, 0).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(packed_dtype), scale
