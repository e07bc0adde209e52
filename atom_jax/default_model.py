"""Which model a front end gets for `--model`: the one resolver that `serve`, `generate` and
`demo` (through `Engine`) share.

    None        the embedded default: the tiny DeepSeek-V4 trained on the standard library's
                docstrings (`python -m atom_jax.train_tiny`), shipped in atom_jax/assets/tiny_default
    "random"    the tiny preset with random weights (seeded; noise, but no checkpoint needed)
    a directory an HF / DeepSeek-official / orbax checkpoint (its own tokenizer, if it has one)

The two embedded models use the byte tokenizer (`atom_jax.tokenizer`)."""

from __future__ import annotations

import dataclasses
import os

RANDOM = "random"
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_default")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    kind: str  # "default" (the shipped trained model), "random" or "dir"
    path: str | None  # checkpoint directory; None for "random"

    @property
    def byte_tokenizer(self) -> bool:
        """The embedded models (trained default and random) read and write bytes."""
        return self.kind in ("default", RANDOM)


def resolve_model(model: str | None) -> ModelSource:
    """`--model` value -> where its weights come from."""
    if model is None:
        return ModelSource("default", DEFAULT_MODEL_DIR)
    if model == RANDOM:
        return ModelSource(RANDOM, None)
    return ModelSource("dir", model)


def byte_model_config():
    """The embedded models' config: the tiny preset with the byte tokenizer's BOS / EOS ids
    (the trained default was trained with them; the random model must stop on the same EOS)."""
    from atom_jax.config import tiny
    from atom_jax.tokenizer import BOS_ID, EOS_ID

    return tiny().replace(bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def load_resolved(source: ModelSource, seed: int = 0, dtype=None, weights: str = "auto", host: bool = False,
                  expert_layout: str = "nmajor"):
    """Build the model `source` names (float32 unless `dtype` says otherwise) in weight format
    `weights` (auto / bf16 / native / fp4-experts: `loader.load_model`; random weights:
    `packed_params.random_format`, auto = bf16).
    `expert_layout`: the FP4 experts' code layout, "nmajor" or "kmajor" (weights.formats).
    `host`: a safetensors checkpoint's parameters stay in host memory for the caller to place."""
    import jax.numpy as jnp

    from atom_jax.loader import ORBAX_SUBDIR, load_model, random_model
    from atom_jax.weights.formats import random_format

    dtype = jnp.float32 if dtype is None else dtype
    if source.kind == "default" and not os.path.isdir(os.path.join(source.path, ORBAX_SUBDIR)):
        raise FileNotFoundError(f"the embedded default model is missing from {source.path}; "
                                "pass --model random, or rebuild it with python -m atom_jax.train_tiny")
    if source.kind == RANDOM:
        return random_model(byte_model_config(), seed=seed, dtype=dtype, weights=random_format(weights),
                            expert_layout=expert_layout)
    return load_model(source.path, dtype=dtype, weights=weights, host=host, expert_layout=expert_layout)


def model_format(source: ModelSource, weights: str = "auto") -> str:
    """The weight format `load_resolved(source, weights=weights)` builds (`auto` resolved: random
    weights bf16, a checkpoint by its headers), e.g. to resolve --expert-layout before loading."""
    from atom_jax.weights.formats import random_format

    if source.kind == RANDOM:
        return random_format(weights)
    from atom_jax.loader import resolve_weights

    return resolve_weights(source.path, weights)


def load_resolved_tokenizer(source: ModelSource):
    """The byte tokenizer (with its plain chat format) for the embedded models, else the
    directory's own tokenizer (None when it has none: token-id prompts only)."""
    from atom_jax.tokenizer import load_tokenizer

    return load_tokenizer(None if source.byte_tokenizer else source.path)
