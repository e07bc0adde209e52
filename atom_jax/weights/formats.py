"""The weight formats a model can hold on the device (`--weights`); no jax, so argument parsers
can name them. What each keeps packed (models.packed_params has the layouts):

* `bf16`: every weight dense in the model dtype (FP8 / FP4 checkpoint tensors dequantised).
* `native`: DeepSeek's own formats: routed experts FP4 (W4A16 grouped GEMM), attention and
  shared-expert projections FP8 with 128x128 block scales.
* `fp4-experts`: routed experts FP4 as in `native`; every FP8 projection decoded once, at load or
  build time, to the model dtype (FP8 dense weights save memory, not time, at decode: the
  per-step decode before the matmul costs more than reading the bf16 weight).
* `auto` (a request, not a format): `native` for a checkpoint whose experts are FP4, else `bf16`.

The routed experts' layout (`--expert-layout`; `kernels.packed`). FP4 experts: `nmajor` holds
codes [E, K/2, N] (`Fp4Weights`), `kmajor` [E, N, K/2] (`Fp4WeightsKMajor`: the checkpoint's own
[out, in/2] orientation, which the W4A16 MMA kernel reads with one 32-bit load per four code
bytes); the scales are [E, K/32, N] in both. Dense (bf16) experts: `nmajor` holds [E, K, N],
`kmajor` [E, N, K] (the checkpoint's per-expert Linear [out, in]; the grouped-GEMM seam gets them
as `DenseKMajor`, which the bf16 Pallas kernel multiplies with `transpose_b`). `auto` resolves
by platform and weight format (`resolve_layout`).
"""

from __future__ import annotations

BF16, NATIVE, FP4_EXPERTS_ONLY, AUTO = "bf16", "native", "fp4-experts", "auto"
MODEL_FORMATS = (BF16, NATIVE, FP4_EXPERTS_ONLY)  # what a model is built in
WEIGHT_FORMATS = (AUTO,) + MODEL_FORMATS  # `--weights`; `auto` is resolved by the loader

FORMATS_HELP = ("bf16 dequantises DeepSeek's FP8 / FP4 tensors to the model dtype; native keeps the "
                "routed experts FP4 (W4A16 grouped GEMM) and the attention and shared-expert "
                "projections FP8; fp4-experts keeps the experts FP4 and decodes the FP8 projections "
                "to the model dtype once, at load")


def check_format(weights: str) -> str:
    if weights not in MODEL_FORMATS:
        raise ValueError(f"model weight format {weights!r}: choose from {MODEL_FORMATS} "
                         f"({AUTO!r} is resolved by the loader)")
    return weights


def packed_experts(weights: str) -> bool:
    """Routed experts kept FP4 (codes + ue8m0 scales)."""
    return check_format(weights) in (NATIVE, FP4_EXPERTS_ONLY)


def packed_dense(weights: str) -> bool:
    """Attention / shared-expert projections kept FP8 (codes + block scales)."""
    return check_format(weights) == NATIVE


def random_format(weights: str) -> str:
    """The format of random weights asked for with `--weights` (no checkpoint: `auto` = bf16)."""
    return BF16 if weights == AUTO else check_format(weights)


NMAJOR, KMAJOR = "nmajor", "kmajor"
EXPERT_LAYOUTS = (NMAJOR, KMAJOR)  # what a model holds
LAYOUT_CHOICES = (AUTO,) + EXPERT_LAYOUTS  # `--expert-layout`
LAYOUT_HELP = ("layout of the routed experts on the device: kmajor [E, N, K] (FP4 codes [E, N, K/2]; "
               "the checkpoint's own orientation), nmajor [E, K, N] (codes [E, K/2, N]); auto: for FP4 "
               "experts kmajor on GPU (the W4A16 kernel's fastest), for bf16 experts nmajor (kmajor "
               "unmeasured end to end), nmajor on CPU")

# `auto` for dense (bf16) experts on a GPU: kmajor when True. The bf16 Pallas grouped GEMM with
# its B tile K-major (`transpose_b`, [G, N, K]) ran the V4-Flash expert GEMMs at 8K tokens per
# rank in 1.374 ms (up) / 1.448 ms (down) on an H200, against 1.54 / 1.64 ms with [G, K, N]
# (`bench w4a16 --prefill-sweep`, docs/benchmarks.md "Session 10", call 4): 7-11% faster at
# prefill; decode (DECODE_TILES, transpose_b) and whole-engine runs are unmeasured, so False
# until `bench long-context --expert-layout nmajor,kmajor` says otherwise.
BF16_KMAJOR_ON_GPU = False


def resolve_layout(layout: str, platform: str, weights: str) -> str:
    """`--expert-layout` for a run on `platform` (jax's backend name) of a model in format
    `weights` (its experts FP4 unless `bf16`; `auto`, not yet resolved: as FP4, the format `auto`
    gives a checkpoint with FP4 experts). `auto`: nmajor on CPU (the jnp path decodes
    either, nmajor without a transpose); on a GPU kmajor for FP4 experts (1.5x faster W4A16
    decode at 64 tokens per rank, 1.17x at 256, H200 2026-12-01, docs/benchmarks.md), for bf16
    experts kmajor only where BF16_KMAJOR_ON_GPU."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"--expert-layout {layout!r}: choose from {LAYOUT_CHOICES}")
    if layout != AUTO:
        return layout
    if platform == "cpu":
        return NMAJOR
    if weights != AUTO and check_format(weights) == BF16 and not BF16_KMAJOR_ON_GPU:
        return NMAJOR
    return KMAJOR


def model_layout(weights: str, layout: str) -> str:
    """The layout a model in format `weights` holds when `layout` ("nmajor" / "kmajor") is asked
    for: FP4 experts' codes and dense experts alike."""
    check_format(weights)
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r}: choose from {EXPERT_LAYOUTS} ({AUTO!r} is resolved by "
                         "resolve_layout)")
    return layout
