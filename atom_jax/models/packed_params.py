"""Parameters kept in DeepSeek's packed formats (`--weights native`): which weights, how they are
stored in the model, their random initialisation, and the matmuls that read them.
Which of them a model keeps packed: its weight format (weights.formats: `native` both kinds,
`fp4-experts` only the experts, `bf16` none).

* routed experts w1/w3/w2: FP4 (`kernels.packed.Fp4Weights` layout): `w1` holds uint8 codes
  [E, K/2, N] and `w1_scale` uint8 ue8m0 [E, K/32, N]; the grouped-GEMM seam takes them packed.
  With the K-major layout (the MoE's `expert_layout` "kmajor", `--expert-layout`) `w1` holds the
  codes [E, N, K/2] (`Fp4WeightsKMajor`), the scales as before; dense (bf16) experts are then
  held [E, N, K] and handed to the seam as `DenseKMajor`.
* attention wq_a + wkv (fused: `wqkv`), wq_b, wo_a, wo_b and the shared expert: FP8 e4m3 codes as uint8 in the
  checkpoint's [out, in] orientation, `<name>_scale` float32 128x128 block scales.
* fused projections (FUSED: matrices that take the same input, one parameter filled at load
  time, one matmul per step, its result split by `fused_linear`): the float form holds the parts'
  columns side by side; the FP8 form holds each part's rows padded to a multiple of the 128-row
  scale block (`fp8_rows`; V4's widths need no padding), so every part keeps its own scales.
Everything else (embeddings, head, norms, mHC, router, compressor, indexer) stays `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atom_jax.kernels import packed
from atom_jax.weights.formats import KMAJOR

SCALE = "_scale"  # suffix of a packed weight's scale parameter

FP8_ATTENTION = ("wqkv", "wq_b", "wo_a", "wo_b")
FP8_SHARED = ("s_w13", "s_w2")

# fused parameter -> the checkpoint matrices it holds, in column order (models/param_map.py):
# the attention input's query down projection and kv projection; the shared expert's gate and up
FUSED = {"wqkv": ("wq_a", "wkv"), "s_w13": ("s_w1", "s_w3")}


def fused_widths(cfg, name: str) -> tuple[int, ...]:
    """The output widths of the parts of fused parameter `name` (FUSED), in order."""
    if name == "wqkv":
        return cfg.q_lora_rank, cfg.head_dim
    if name == "s_w13":
        si = cfg.moe_intermediate_size * cfg.n_shared_experts
        return si, si
    raise ValueError(f"{name!r} is not a fused parameter; known: {list(FUSED)}")
FP4_EXPERTS = ("w1", "w3", "w2")

# Random packed weights with about the spread of `normal_param`'s 0.02: uniform e2m1 codes have
# rms 2.93, so ue8m0 scale 2**-7 (code 120) gives rms 0.023; uniform e4m3 codes with the NaN
# codes clamped away have rms ~150, so the FP8 block scale is 0.02 / 150.
FP4_RANDOM_SCALE_CODE = 120
FP8_RANDOM_SCALE = 0.02 / 150.0


def random_codes(key, shape):
    """Uniform uint8 codes without e4m3's NaN codes (0x7F / 0xFF); every byte is valid FP4."""
    c = jax.random.randint(key, shape, 0, 256, jnp.int32)
    return (jnp.minimum(c & 0x7F, 0x7E) | (c & 0x80)).astype(jnp.uint8)


def random_leaf(key, name: str, shape, dtype):
    """Random value of a packed parameter leaf named `name` (None if the leaf is not packed)."""
    if name.endswith(SCALE):
        if dtype == jnp.uint8:  # FP4 ue8m0 scales
            return jnp.full(shape, FP4_RANDOM_SCALE_CODE, jnp.uint8)
        return jnp.full(shape, FP8_RANDOM_SCALE, dtype)
    if dtype == jnp.uint8:
        return random_codes(key, shape)
    return None


def fp4_stack(rngs: nnx.Rngs, e: int, k: int, n: int, k_major: bool = False):
    """(codes Param uint8 [e, k/2, n], or [e, n, k/2] when `k_major`; scales Param uint8
    [e, k/32, n]) for experts [e, k, n]."""
    if k % packed.FP4_BLOCK:
        raise ValueError(f"FP4 experts need K a multiple of {packed.FP4_BLOCK}, got {k}")
    codes = random_codes(rngs.params(), (e, n, k // 2) if k_major else (e, k // 2, n))
    return nnx.Param(codes), nnx.Param(jnp.full((e, k // packed.FP4_BLOCK, n), FP4_RANDOM_SCALE_CODE, jnp.uint8))


def fp8_matrix(rngs: nnx.Rngs, in_f: int, out_f: int):
    """(codes Param uint8 [out, in], block scales Param float32) for a weight used as [in, out]."""
    b = packed.FP8_BLOCK
    codes = random_codes(rngs.params(), (out_f, in_f))
    return nnx.Param(codes), nnx.Param(jnp.full((-(-out_f // b), -(-in_f // b)), FP8_RANDOM_SCALE, jnp.float32))


def fp8_rows(width: int) -> int:
    """Rows a part of `width` outputs takes in a fused FP8 parameter (whole scale blocks)."""
    return -(-width // packed.FP8_BLOCK) * packed.FP8_BLOCK


def fused_offsets(widths, fp8: bool) -> list[tuple[int, int]]:
    """(start, stop) of each part of a fused parameter along its output axis: the float form's
    columns, or (fp8) the FP8 form's rows (each part padded to whole scale blocks)."""
    out, off = [], 0
    for w in widths:
        out.append((off, off + w))
        off += fp8_rows(w) if fp8 else w
    return out


def fused_matrix(module, name: str, rngs: nnx.Rngs, in_f: int, dtype, fp8: bool):
    """Set `module.<name>` (and `<name>_scale`) to a random fused projection (FUSED)."""
    widths = fused_widths(module.cfg, name)
    if fp8:
        codes, scale = fp8_matrix(rngs, in_f, sum(fp8_rows(w) for w in widths))
        setattr(module, name, codes)
        setattr(module, name + SCALE, scale)
    else:
        setattr(module, name, nnx.Param(jax.random.normal(rngs.params(), (in_f, sum(widths)), jnp.float32)
                                         .astype(dtype) * 0.02))


def fused_linear(x, module, name: str):
    """x @ each part of the fused projection `module.<name>` (float or FP8): ONE matmul, split.
    -> [x @ part for each part, in FUSED order]."""
    widths = fused_widths(module.cfg, name)
    y = linear(x, module, name)
    fp8 = getattr(module, name + SCALE, None) is not None
    return [y[..., a:b] for a, b in fused_offsets(widths, fp8)]


def linear(x, module, name: str):
    """x @ module.<name> for a [in, out] weight, or its FP8 packed form when `<name>_scale` exists."""
    scale = getattr(module, name + SCALE, None)
    if scale is None:
        return x @ getattr(module, name)[...]
    return packed.fp8_linear(x, getattr(module, name)[...], scale[...])


def expert_weights(module, name: str):
    """The grouped-GEMM operand of an expert stack: the dense [E, K, N] array, or Fp4Weights;
    when the module's `expert_layout` is "kmajor", `DenseKMajor` (the array held [E, N, K]) or
    Fp4WeightsKMajor."""
    scale = getattr(module, name + SCALE, None)
    k_major = module.expert_layout == KMAJOR
    if scale is None:
        w = getattr(module, name)[...]
        return packed.DenseKMajor(w) if k_major else w
    return packed.fp4_weights(getattr(module, name)[...], scale[...], k_major)
