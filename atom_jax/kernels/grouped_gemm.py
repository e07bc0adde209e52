"""The grouped-GEMM seam for routed experts.

rows [M, K] are sorted by group; group g owns `group_sizes[g]` consecutive rows; weights
[G, K, N]. Rows past sum(group_sizes) must come out as zeros. `mean_group` (the average rows per
group implied by the routing shape) lets capacity-based backends size themselves statically. Backends register by name;
`jax.lax.ragged_dot` is the portable default (fine on CPU; on GPU it lowers to a dense masked
product, see docs/design.md "Measured facts", so GPU backends plug in here).

`row_ids` [M] int32 (optional): the rows are then `rows[row_ids]` (rows [R, K], any R; the
output has M rows). The MoE's first GEMMs pass the token of each sorted (token, choice) row, so
that kernels which gather rows inside their A-tile load (`GATHERS_ROWS`: the Pallas and W4A16
Triton kernels) never materialise the [M, K] gathered rows; the other backends gather in XLA
(the same values). `zero_tail=False` (the MoE, which never reads them) lets those kernels leave
the rows past the last group unwritten instead of storing zeros there (under DP with experts
sharded most rows are other ranks' choices: 7/8 of them at dp=8); other backends zero them anyway.
`epilogue=(fn, other)` (other [M, N]): the result is fn(other as float32, the float32 product),
elementwise, for the rows in groups (the MoE's SwiGLU: the w3 GEMM given the w1 product stores h,
so neither its product nor h costs an XLA pass over all M rows); those kernels apply it to each
stored tile (on their float32 accumulator), the seam applies it in XLA for the others (on
their product as stored, rounded to rows.dtype: the rounding the MoE had before the epilogue).

`weights` may also be packed FP4 experts (`packed.Fp4Weights`, or `packed.Fp4WeightsKMajor`: the
same weights with K-major codes, `--expert-layout`; W4A16): `get(name)` then runs the
W4A16 Pallas kernel for the GPU-kernel names ('auto' on GPU; from DEQUANT_MIN_ROWS_PER_GROUP rows
per expert the `fp4_dequant` kernel then the bf16 Pallas kernel), or decodes the weights in jnp and
runs the named bf16 backend (CPU, references); see `w4a16`. K-major codes on the dequant path
decode to `packed.DenseKMajor` ([E, N, K] bf16, no transpose), which the Pallas backend
multiplies as it is (`transpose_b`) and the other backends take as `dense()`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from atom_jax.kernels.platform import is_cpu, is_rocm, target_platform
from atom_jax.kernels.packed import FP4_TYPES, DenseKMajor, Fp4Weights, Fp4WeightsKMajor, fp4_dequantize

GroupedGemm = Callable[..., jax.Array]  # (rows, weights, group_sizes, mean_group=None[, row_ids=None])

_BACKENDS: dict[str, GroupedGemm] = {}
# Backends that take `row_ids`, `zero_tail` and `epilogue` themselves (in the kernel, or passed on
# to one that does).
GATHERS_ROWS: set[str] = set()


def register(name: str, gathers_rows: bool = False):
    def deco(fn: GroupedGemm) -> GroupedGemm:
        _BACKENDS[name] = fn
        if gathers_rows:
            GATHERS_ROWS.add(name)
        return fn

    return deco


def _rows_per_group(rows, weights, mean_group, row_ids=None) -> float:
    """The caller's mean rows per expert (from the routing shape), else this call's average."""
    from atom_jax.kernels.pallas_grouped_gemm import num_rows
    return mean_group if mean_group is not None else num_rows(rows, row_ids) / weights.shape[0]


def _zero_rows_past_groups(out, group_sizes, dtype):
    """Rows past the last group come out zero (some kernels leave them unspecified)."""
    valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, 0.0).astype(dtype)


@register("ragged_dot")
def ragged_dot(rows, weights, group_sizes, mean_group=None):
    out = jax.lax.ragged_dot(rows, weights, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return _zero_rows_past_groups(out, group_sizes, rows.dtype)


@register("dense")
def dense_gather(rows, weights, group_sizes, mean_group=None):
    """Reference backend: each row picks its group's weight (memory M*K*N; tests only)."""
    ends = jnp.cumsum(group_sizes)
    gid = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")
    valid = gid < weights.shape[0]
    w = weights[jnp.minimum(gid, weights.shape[0] - 1)]
    out = jnp.einsum("mk,mkn->mn", rows.astype(jnp.float32), w.astype(jnp.float32))
    return jnp.where(valid[:, None], out, 0.0).astype(rows.dtype)


CAPACITY_FACTOR = 2.0


@register("capacity")
def capacity_padded(rows, weights, group_sizes, mean_group=None):
    """Batched [G, C, K] x [G, K, N] with a static capacity C per group.

    C = CAPACITY_FACTOR x the mean group size (`mean_group`, from the caller's routing shape).
    Rows past a group's capacity are DROPPED (output zero): lossy unless routing is balanced.
    Fast on GPU (plain batched GEMM, no dense product over all groups); benchmarks only until
    the dropless GPU kernels of the grouped-GEMM issue land."""
    cap = _capacity_of(rows, weights, mean_group)
    starts = jnp.cumsum(group_sizes) - group_sizes
    slot = jnp.arange(cap)
    src = starts[:, None] + slot[None, :]  # [G, C] row index of each slot
    valid = slot[None, :] < group_sizes[:, None]
    src = jnp.where(valid, src, 0)
    packed = jnp.where(valid[..., None], rows[src], 0).astype(rows.dtype)  # [G, C, K]
    out = jnp.einsum("gck,gkn->gcn", packed, weights, preferred_element_type=jnp.float32)
    dest = jnp.where(valid, src, rows.shape[0])  # invalid slots scatter out of range (dropped)
    res = jnp.zeros((rows.shape[0], weights.shape[2]), jnp.float32)
    res = res.at[dest.reshape(-1)].set(out.reshape(-1, out.shape[-1]), mode="drop")
    return res.astype(rows.dtype)


def _capacity_of(rows, weights, mean_group) -> int:
    mean = _rows_per_group(rows, weights, mean_group)
    return max(8, int(-(-CAPACITY_FACTOR * mean // 8) * 8))


def _on_cpu() -> bool:
    return is_cpu()


@register("pallas", gathers_rows=True)
def pallas(rows, weights, group_sizes, mean_group=None, row_ids=None, zero_tail=True, epilogue=None):
    """Our Triton-backend Pallas kernel (NVIDIA and ROCm); interpreted on CPU (tests). Takes
    `DenseKMajor` weights as they are (the kernel's `transpose_b`)."""
    from atom_jax.kernels import pallas_grouped_gemm
    tiles = pallas_grouped_gemm.default_tiles(_rows_per_group(rows, weights, mean_group, row_ids),
                                              gathered=row_ids is not None)
    k_major = isinstance(weights, DenseKMajor)
    return pallas_grouped_gemm.grouped_gemm(rows, weights.w if k_major else weights, group_sizes, cfg=tiles,
                                            interpret=_on_cpu(), row_ids=row_ids, zero_tail=zero_tail,
                                            epilogue=epilogue, transpose_b=k_major)


@register("capacity_dropless")
def capacity_dropless(rows, weights, group_sizes, mean_group=None):
    """The capacity batched GEMM for each group's first C rows, plus the Pallas kernel for
    the rows past C: exact for any routing, and as fast as `capacity` when routing is even."""
    from atom_jax.kernels import pallas_grouped_gemm
    cap = _capacity_of(rows, weights, mean_group)
    bulk = capacity_padded(rows, weights, group_sizes, mean_group)
    starts, ends = pallas_grouped_gemm.group_ranges(group_sizes)
    over_starts = jnp.minimum(starts + cap, ends)
    over = pallas_grouped_gemm.grouped_gemm_ranges(
        rows, weights, over_starts, ends, pallas_grouped_gemm.DECODE_TILES, interpret=_on_cpu())
    r = jnp.arange(rows.shape[0])
    gid = jnp.minimum(pallas_grouped_gemm.searchsorted_right(ends, r), weights.shape[0] - 1)
    in_overflow = (r >= over_starts[gid]) & (r < ends[gid])
    return jnp.where(in_overflow[:, None], over, bulk).astype(rows.dtype)


@register("mosaic")
def mosaic(rows, weights, group_sizes, mean_group=None):
    """Our Mosaic GPU kernel (TMA + wgmma, warp-specialized): NVIDIA Hopper only, prefill-sized
    groups (128-row tiles). On H100 faster than the Triton kernel on V4-Flash at 8-16K
    tokens/rank, slower on V4-Pro at 4-8K (docs/benchmarks.md, grouped GEMM round 5)."""
    if target_platform() not in ("gpu", "cuda") or is_rocm():
        raise RuntimeError("the 'mosaic' grouped-GEMM backend needs an NVIDIA Hopper GPU "
                           f"(this run's backend is {target_platform()!r}); use 'pallas' or 'auto'")
    from atom_jax.kernels import mosaic_grouped_gemm
    return mosaic_grouped_gemm.grouped_gemm(rows, weights, group_sizes)


@register("tokamax")
def tokamax_ragged(rows, weights, group_sizes, mean_group=None):
    """tokamax's Mosaic GPU ragged_dot (Hopper only; `pip install tokamax`)."""
    try:
        import tokamax
    except ImportError as e:  # optional dependency
        raise RuntimeError("the 'tokamax' grouped-GEMM backend needs `pip install tokamax` "
                           f"(import failed: {e})") from e
    out = tokamax.ragged_dot(rows, weights, group_sizes.astype(jnp.int32), implementation="mosaic",
                             preferred_element_type=jnp.float32)
    return _zero_rows_past_groups(out, group_sizes, rows.dtype)


def tokamax_usable() -> bool:
    """tokamax's Mosaic kernel needs an NVIDIA Hopper (sm_90) GPU and the package."""
    try:
        import tokamax  # noqa: F401
        dev = jax.devices()[0]
        return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
    except Exception:
        return False


def choose(rows_per_group: float, platform: str | None = None, has_tokamax: bool | None = None) -> str:
    """The backend `auto` resolves to, by platform (default: the target platform, see
    kernels/platform.py) and by rows per expert (routing shape).

    CPU: XLA's ragged_dot. GPU: the crossovers measured by `python -m atom_jax.bench gemm`
    (docs/benchmarks.md, 'Grouped GEMM'): see AUTO_TABLE. ROCm: never tokamax (NVIDIA only)."""
    platform = platform or target_platform()
    if platform == "cpu":
        return "ragged_dot"
    if platform == "rocm" or (platform == "gpu" and is_rocm()):
        has_tokamax = False
    if has_tokamax is None:
        has_tokamax = tokamax_usable()
    for limit, name, needs_tokamax in AUTO_TABLE:
        if rows_per_group <= limit and (has_tokamax or not needs_tokamax):
            return name
    return "pallas"


# (rows per group at most, backend, needs tokamax), first match wins. From the H100 table in
# docs/benchmarks.md ('Grouped GEMM'): tokamax streams weights faster while groups are small
# (93% vs 86-90% of copy bandwidth up to 512 tokens/rank); our Pallas kernel with 128x256
# tiles is faster from ~1K tokens/rank (48 rows per expert) up, and is the only one on ROCm.
AUTO_TABLE: list[tuple[float, str, bool]] = [
    (32.0, "tokamax", True),
    (float("inf"), "pallas", False),
]


def dense_backend(name: str, rows_per_group: float) -> str:
    """The backend `get(name)` runs on dense (bf16) weights at this many rows per expert: `choose`'s
    for 'auto', else `name` (for 'auto', plain calls may take the Mosaic kernel instead: see
    `plain_on_mosaic`; the FP4 dequant path and `decode_ahead`'s decoded stacks go through `auto`
    alike)."""
    return choose(rows_per_group) if name == "auto" else name


# Plain calls (rows in place, no epilogue: the MoE's down projection) on bf16 [G, K, N] experts run on
# the Mosaic kernel on an NVIDIA Hopper GPU at rows per expert in (lo, hi]; the calls that gather their
# rows or apply the SwiGLU (gate, up) stay on the Triton kernel, which does both in its loads and
# epilogue (the Mosaic kernel does neither, and XLA's gather and SwiGLU cost more than it saves:
# session 19). H200 (docs/benchmarks.md): at ~192 rows per expert (an 8K-token chunk at dp = 1) the
# Mosaic kernel's down call took 1.786 / 1.906 ms against Triton's 1.946 / 2.062 (session 19, two
# machines); `bench gemm --shapes flash_down` (session 22, 128 experts, ms Mosaic / Triton) at 96 rows
# 0.624 / 0.596, 144 0.883 / 0.873, 192 0.919 / 0.936, 240 0.980 / 1.020, 288 1.265 / 1.320, 384
# 1.491 / 1.598. Above 256 it is left out: at dp = 2 (~384) half the rows of the engine's call are
# other ranks' choices past the last group, which the Mosaic kernel stores as zeros and Triton skips
# (session 19 in the engine's case: Mosaic 1.622 / 1.730 against Triton 1.506 / 1.651).
MOSAIC_PLAIN_ROWS_PER_GROUP: tuple[float, float] | None = (128.0, 256.0)


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and not is_rocm() and str(getattr(dev, "compute_capability", "")).startswith("9")


def plain_on_mosaic(rows, weights, rows_per_group: float, hopper: bool | None = None) -> bool:
    """Whether `auto` runs a plain call (no `row_ids`, no epilogue) on the Mosaic kernel: on Hopper
    (`hopper`, default: this process's first device), rows per expert in MOSAIC_PLAIN_ROWS_PER_GROUP,
    bf16 rows and dense [G, K, N] bf16 weights whose K and N its tiles divide."""
    window = MOSAIC_PLAIN_ROWS_PER_GROUP
    if window is None or not window[0] < rows_per_group <= window[1]:
        return False
    if not isinstance(weights, jax.Array | jax.ShapeDtypeStruct) or weights.ndim != 3:
        return False
    if rows.dtype != jnp.bfloat16 or weights.dtype != jnp.bfloat16:
        return False
    from atom_jax.kernels import mosaic_grouped_gemm
    if not mosaic_grouped_gemm.fits(weights.shape[1], weights.shape[2]):
        return False
    return _is_hopper() if hopper is None else hopper


@register("auto", gathers_rows=True)
def auto(rows, weights, group_sizes, mean_group=None, row_ids=None, zero_tail=True, epilogue=None):
    rows_per_group = _rows_per_group(rows, weights, mean_group, row_ids)
    name = dense_backend("auto", rows_per_group)
    if row_ids is None and epilogue is None and not _on_cpu() and plain_on_mosaic(rows, weights, rows_per_group):
        name = "mosaic"
    return get(name)(rows, weights, group_sizes, mean_group, row_ids=row_ids, zero_tail=zero_tail, epilogue=epilogue)


# Backend names that mean "our GPU kernel": with packed FP4 weights they all run the W4A16
# Triton kernel (the Mosaic and tokamax kernels take bf16 weights only).
W4A16_KERNEL_NAMES = frozenset({"pallas", "capacity_dropless", "mosaic", "tokamax"})
# Backend names that take `DenseKMajor` weights as they are ('auto' passes them on to its choice).
TAKES_DENSE_K_MAJOR = frozenset({"pallas", "auto"})


# Rows per expert from which packed FP4 experts are first decoded to bf16 by the streaming
# `fp4_dequant` kernel and then multiplied by the bf16 Pallas kernel, instead of decoded inside
# the W4A16 kernel (which decodes the same weights again in every row tile). Measured on an H200
# (`python -m atom_jax.bench w4a16 --tokens 64,1024,8192 --shapes flash_up,pro_up`,
# docs/benchmarks.md): the decode-then-bf16 path takes 0.65x (V4-Flash) / 0.75x (V4-Pro) the
# W4A16 time at 384 / 256 rows per expert and 2.4x at 32-48 rows; interpolated, the two cross
# near 150-180 rows. The choice is static (per compiled bucket): a data-dependent switch would
# be an XLA conditional, whose predicate the GPU runtime reads on the host.
# The path holds a transient bf16 copy of the layer's experts per GEMM (V4-Flash up projection
# over 2 ranks: 128 x 4096 x 2048 x 2 B = 2.1 GB), inside the memory plan's reserve.
DEQUANT_MIN_ROWS_PER_GROUP = 192


# K-major codes on the dequant path: False = `fp4_dequant.dequantize` (each code tile transposed in
# the kernel, [E, K, N] bf16, then the bf16 kernel); True = `fp4_dequant.dequantize_k_major` ([E, N,
# K] bf16, no transpose: each output column decodes its own code byte's nibble, 16-byte stores; then
# the bf16 kernel with `transpose_b`). Measured on an H200 (`bench w4a16 --tokens 8192 --shapes
# flash_up,flash_down --kernels dequant_pallas,dequant_pallas_kmajor,dequant_pallas_kmajor_transpose`,
# 2026-12-01 session 11, same run): path 2.117 / 2.212 ms (51% / 47% of dense) against the
# transposing decode's 2.457 / 2.544 ms (44% / 41%), 0.86x the time, values as exact as the bf16
# row's (the GPU tests of the decode pass). Session 10's earlier no-transpose decodes were wrong
# (register interleave) or slow (strided halves).
KMAJOR_DECODE_TO_NK = True


def _decodes_to_nk(weights) -> bool:
    """Whether the dequant path decodes these experts to [E, N, K] (`dequantize_k_major`)."""
    return isinstance(weights, Fp4WeightsKMajor) and KMAJOR_DECODE_TO_NK


def _dequant_path_fits(weights: Fp4Weights, rows_per_group: float) -> bool:
    """Whether the decode kernel and then the bf16 Pallas kernel take these experts' K and N
    (their tiles must divide them; e.g. N = 384, V4-Pro's intermediate size split 8 ways, does
    not): where not, the W4A16 kernel (128-wide column tiles) runs at every rows-per-expert."""
    from atom_jax.kernels import fp4_dequant, pallas_grouped_gemm
    _, k, n = weights.shape
    try:
        if _decodes_to_nk(weights):
            fp4_dequant.k_major_block_sizes(k, n)
        else:
            fp4_dequant.block_sizes(k, n)
        pallas_grouped_gemm.block_sizes(k, n, pallas_grouped_gemm.default_tiles(rows_per_group))
    except ValueError:
        return False
    return True


def _packed_path(name: str, weights: Fp4Weights | Fp4WeightsKMajor, rows_per_group: float) -> tuple[str, str]:
    """How backend `name` multiplies packed FP4 experts at `rows_per_group` rows per expert (the
    one decision, for `w4a16` and `decode_ahead`): ("w4a16", kernel name): decoded inside the
    W4A16 kernel; ("dequant", "pallas"): decoded by the `fp4_dequant` kernel, then the bf16 Pallas
    kernel; ("jnp", bf16 backend): decoded in jnp (exact), then that backend."""
    if name == "auto":
        name = "ragged_dot" if _on_cpu() else "pallas"
    if name not in W4A16_KERNEL_NAMES:
        return "jnp", name
    if rows_per_group >= DEQUANT_MIN_ROWS_PER_GROUP and _dequant_path_fits(weights, rows_per_group):
        return "dequant", "pallas"
    return "w4a16", name


def _decode(how: str, weights: Fp4Weights | Fp4WeightsKMajor, dtype):
    """The experts decoded for `how`: the decode kernel's [E, K, N] bf16, or `DenseKMajor` [E, N,
    K] from K-major codes where KMAJOR_DECODE_TO_NK; jnp's [E, K, N] for "jnp"."""
    if how == "dequant":
        from atom_jax.kernels import fp4_dequant
        if _decodes_to_nk(weights):
            return DenseKMajor(fp4_dequant.dequantize_k_major(weights, interpret=_on_cpu()).astype(dtype))
        return fp4_dequant.dequantize(weights, interpret=_on_cpu()).astype(dtype)
    return fp4_dequantize(weights, dtype)


def w4a16(name: str, rows, weights: Fp4Weights | Fp4WeightsKMajor, group_sizes, mean_group=None, row_ids=None,
          zero_tail=True, epilogue=None):
    """Packed FP4 experts through backend `name`. For the GPU-kernel names and for 'auto' on GPU:
    the W4A16 Pallas kernel (interpreted on CPU) below DEQUANT_MIN_ROWS_PER_GROUP rows per
    expert, from there the experts decoded by the `fp4_dequant` kernel and the bf16 Pallas kernel
    (for 'auto': its bf16 choice, so a plain call of N-major decoded experts in the Mosaic window
    takes the Mosaic kernel, as `decode_ahead`'s stacks do) (decoding in one XLA pass instead
    measured slower on an H200, 1.1-1.4x at 8K tokens/rank: XLA streamed ~1 TB/s). Other names: the weights decoded to rows.dtype in jnp (exact) and the named
    bf16 backend ('auto' on CPU: ragged_dot). Both kernel paths gather `row_ids` themselves."""
    rows_per_group = _rows_per_group(rows, weights, mean_group, row_ids)
    how, backend = _packed_path(name, weights, rows_per_group)
    if how == "w4a16":
        from atom_jax.kernels import w4a16_grouped_gemm
        tiles = w4a16_grouped_gemm.default_tiles(rows_per_group, isinstance(weights, Fp4WeightsKMajor))
        return w4a16_grouped_gemm.grouped_gemm(rows, weights, group_sizes, cfg=tiles, interpret=_on_cpu(),
                                               row_ids=row_ids, zero_tail=zero_tail, epilogue=epilogue)
    dense = _decode(how, weights, rows.dtype)
    if how == "dequant":  # 'auto' as it runs bf16 experts (its plain calls may take the Mosaic kernel), else Pallas
        run = auto if name == "auto" else pallas
        return run(rows, dense, group_sizes, mean_group, row_ids=row_ids, zero_tail=zero_tail, epilogue=epilogue)
    return get(backend)(rows, dense, group_sizes, mean_group, row_ids=row_ids, epilogue=epilogue)


def decode_ahead(name: str, weights, rows_per_group: float, dtype):
    """The experts as `get(name)` would decode them for a call of `rows_per_group` rows per expert,
    decoded now, so that several GEMMs share one decode (the two TBO chains of a layer); `get(name)`
    given them multiplies exactly as it would the packed weights. None where `get(name)` would
    not decode them first: dense weights, the W4A16 kernel's rows per expert, and the kernel names
    whose decoded path `get(name)` would not take given bf16 weights (e.g. 'mosaic')."""
    if not isinstance(weights, FP4_TYPES):
        return None
    how, backend = _packed_path(name, weights, rows_per_group)
    if how == "w4a16" or dense_backend(name, rows_per_group) != backend:
        return None
    return _decode(how, weights, dtype)


# Rows per expert from which `gate_up` runs the gate and up GEMMs as one Pallas kernel
# (`pallas_grouped_gemm.grouped_gemm_pair`) where the backend resolves to the bf16 Pallas kernel.
# inf (never): on an H200 (`python -m atom_jax.bench gemm --prefill-tiles`, 2026-12-01 session 10)
# the fused kernel at its best tiles lost to the two calls at a prefill chunk's up projection,
# 4.27 vs 3.82 ms (192 rows per expert) and 3.61 vs 3.44 ms (384). FP4 experts on the dequant path
# are then decoded to bf16 both before the one call (two transient stacks at once, not one after
# the other; V4-Flash at dp=2: 2 x 2.1 GB).
FUSE_GATE_UP_MIN_ROWS_PER_GROUP = float("inf")


def fused_gate_up(name: str, w_gate, w_up, rows_per_group: float) -> bool:
    """Whether `gate_up` runs backend `name`'s gate and up GEMMs as one kernel at this many rows
    per expert: from FUSE_GATE_UP_MIN_ROWS_PER_GROUP, where the seam would run both on the bf16
    Pallas kernel (dense experts, `DenseKMajor` included; FP4 experts where it decodes them to bf16
    first), stacks of one shape and type whose K and N the pair's tiles divide."""
    from atom_jax.kernels import pallas_grouped_gemm
    if rows_per_group < FUSE_GATE_UP_MIN_ROWS_PER_GROUP:
        return False
    if w_gate.shape != w_up.shape or type(w_gate) is not type(w_up):
        return False
    if isinstance(w_gate, FP4_TYPES):
        if _packed_path(name, w_gate, rows_per_group) != ("dequant", "pallas"):
            return False
    elif dense_backend(name, rows_per_group) != "pallas":
        return False
    _, k, n = w_gate.shape
    try:
        pallas_grouped_gemm.block_sizes(k, n, pallas_grouped_gemm.pair_tiles(rows_per_group))
    except ValueError:
        return False
    return True


def gate_up(name: str, rows, w_gate, w_up, group_sizes, act, mean_group=None, row_ids=None, zero_tail=True):
    """act(rows @ w_gate as rows.dtype, as float32; rows @ w_up, float32) for the rows in groups
    (the MoE's h = SwiGLU(x w1, x w3)), backend `name`: the gate GEMM, then the up GEMM with act
    as its epilogue; or, where `fused_gate_up`, both in one Pallas kernel (same values: each A
    tile loaded once, the gate product not stored). `row_ids` and `zero_tail` as `get(name)`."""
    rows_per_group = _rows_per_group(rows, w_gate, mean_group, row_ids)
    if fused_gate_up(name, w_gate, w_up, rows_per_group):
        from atom_jax.kernels import pallas_grouped_gemm
        if isinstance(w_gate, FP4_TYPES):
            w_gate, w_up = (_decode("dequant", w, rows.dtype) for w in (w_gate, w_up))
        k_major = isinstance(w_gate, DenseKMajor)  # [G, N, K] as decoded from K-major codes
        w_gate, w_up = (w.w if k_major else w for w in (w_gate, w_up))
        return pallas_grouped_gemm.grouped_gemm_pair(
            rows, w_gate, w_up, group_sizes, act, cfg=pallas_grouped_gemm.pair_tiles(rows_per_group),
            interpret=_on_cpu(), row_ids=row_ids, zero_tail=zero_tail, transpose_b=k_major)
    gemm = get(name)
    gate = gemm(rows, w_gate, group_sizes, mean_group=mean_group, row_ids=row_ids, zero_tail=zero_tail)
    return gemm(rows, w_up, group_sizes, mean_group=mean_group, row_ids=row_ids, zero_tail=zero_tail,
                epilogue=(act, gate))


def get(name: str) -> GroupedGemm:
    """Backend `name`, taking bf16 weights [G, K, N] (or `DenseKMajor`) or packed `Fp4Weights` / `Fp4WeightsKMajor`, and optional
    `row_ids` (rows[row_ids] gathered in the kernel where it can, else in XLA), `zero_tail`
    (False: rows past the last group may be left unwritten) and `epilogue` (fn, other)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown grouped-GEMM backend {name!r}; known: {sorted(_BACKENDS)}")
    backend = _BACKENDS[name]

    def run(rows, weights, group_sizes, mean_group=None, row_ids=None, zero_tail=True, epilogue=None):
        if isinstance(weights, FP4_TYPES):
            return w4a16(name, rows, weights, group_sizes, mean_group, row_ids, zero_tail, epilogue)
        if isinstance(weights, DenseKMajor) and name not in TAKES_DENSE_K_MAJOR:
            weights = weights.dense()
        if name in GATHERS_ROWS:
            return backend(rows, weights, group_sizes, mean_group, row_ids=row_ids, zero_tail=zero_tail,
                           epilogue=epilogue)
        if row_ids is not None:
            rows = rows[row_ids]  # XLA gathers the rows
        out = backend(rows, weights, group_sizes, mean_group)
        if epilogue is None:
            return out
        fn, other = epilogue
        return _zero_rows_past_groups(fn(other.astype(jnp.float32), out.astype(jnp.float32)), group_sizes, rows.dtype)

    return run


def available() -> list[str]:
    return sorted(_BACKENDS)
